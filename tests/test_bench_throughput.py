"""`lmport bench throughput` runs both sides of its comparison on one device and reports what it measured."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_throughput_bench_compares_engine_and_transformers_on_one_device():
    run = subprocess.run([sys.executable, "-m", "lmport.bridge.cli", "bench", "throughput", "--num-prompts", "3",
                          "--max-tokens", "4", "--device", "cpu", "--json"],
                         capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(run.stdout)
    assert result["workload"]["device"] == "cpu"
    assert result["lmport"]["output_tokens"] == result["hf"]["output_tokens"] == 12
    assert result["lmport"]["cuda_graph_steps"] == 0
    assert result["ratio"] == pytest.approx(result["lmport"]["output_tok_s"] / result["hf"]["output_tok_s"])
