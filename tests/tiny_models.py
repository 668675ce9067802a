"""Tiny random-init model directories for the multi-model, keep_alive and memory-budget tests: each loads in well
under a second and holds about 1.4 MiB (0.4 MiB of weights, a 1 MiB KV cache)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.model_harness import write_tiny_model_dir

# every tiny model's engine options beside its model path
TINY_ENGINE: dict[str, Any] = {"dtype": "float32", "max_model_len": 128, "kv_cache_memory_bytes": 1 << 20,
                               "max_num_seqs": 4}


def tiny_model_dirs(root: Path, count: int) -> list[str]:
    """`count` model directories under root, different weights each (seeds 0, 1, ...)."""
    paths = []
    for seed in range(count):
        path = root / f"tiny-{seed}"
        write_tiny_model_dir(path, seed=seed)
        paths.append(str(path))
    return paths


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "the condition") -> Any:
    """Poll until predicate() is truthy; returns its value."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)
