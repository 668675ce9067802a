"""The `lmport` command reports a bad argument as one line naming it (exit 2), with no traceback and no worker left."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest
import torch


def lmport(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmport.bridge.cli", "--log-level", "WARNING", *args],
                          capture_output=True, text=True, timeout=300)


def workers() -> set[int]:
    return {p.pid for p in psutil.process_iter(["cmdline"]) if "lmport.bridge.worker" in " ".join(p.info["cmdline"] or [])}


@pytest.mark.slow
def test_a_bad_sampling_parameter_through_the_worker_names_the_field():
    before = workers()
    run = lmport("generate", "Hi", "--max-tokens", "0")
    assert run.returncode == 2
    assert run.stderr.strip().endswith(
        "lmport generate: error: invalid_params: sampling_params.max_tokens: must be >= 1, got 0"), run.stderr
    assert "Traceback" not in run.stderr
    assert workers() <= before, "the command's worker outlived it"


def test_a_bad_sampling_parameter_is_reported_before_any_model_loads():
    run = lmport("generate", "Hi", "--model", "no-such-model-anywhere", "--max-tokens", "0")
    assert run.returncode == 2
    assert run.stderr.strip().endswith(
        "lmport generate: error: invalid_params: sampling_params.max_tokens: must be >= 1, got 0"), run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_names_the_field():
    run = lmport("bench", "throughput", "--device", "cuda", "--skip-hf")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "lmport bench: error: device: 'cuda' requested but CUDA is not available" in run.stderr


@pytest.mark.slow
def test_the_first_run_says_it_converts_the_bundled_model_and_prints_no_progress_noise(tmp_path):
    """A fresh model cache: one line says the bundled GGUF is converted (first run only); the next run says nothing
    on stderr; both print the generation."""
    env = {**os.environ, "LMPORT_CACHE": str(tmp_path)}
    command = [sys.executable, "-m", "lmport.bridge.cli", "generate", "The sea is", "--max-tokens", "4"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "converting the bundled model (first run only) …" in first.stderr
    assert "Loading weights" not in first.stderr
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and second.stderr == "", second.stderr
    assert first.stdout.strip() and first.stdout == second.stdout
