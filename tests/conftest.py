"""Tests never reach the internet: the hub is offline for this process and every worker it spawns.

The hub-download tests serve a model from a local server and turn this off for themselves. huggingface_hub reads
HF_HUB_OFFLINE once, at import, so they download in a subprocess with a clean environment or patch
huggingface_hub.constants.HF_HUB_OFFLINE."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
