"""Preloaded into a worker (--preload tests.bridge_spawn_child): starts a long-lived child process in the worker's
process group and writes its pid to stderr, so the tests can check that cleanup reaches children too."""

from __future__ import annotations

import subprocess
import sys

CHILD = subprocess.Popen(["sleep", "600"])
print(f"CHILD_PID={CHILD.pid}", file=sys.stderr, flush=True)
