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
    assert result["lmport"]["cpu_decode_stack_steps"] >= 3  # the 3 prompts' tokens after their prefill
    assert result["ratio"] == pytest.approx(result["lmport"]["output_tok_s"] / result["hf"]["output_tok_s"])


def test_profile_bench_splits_each_step_into_phases_and_the_runner_into_operators():
    run = subprocess.run([sys.executable, "-m", "lmport.bridge.cli", "bench", "profile", "--batch", "2",
                          "--max-tokens", "4", "--json"], capture_output=True, text=True, timeout=300, check=True)
    [entry] = json.loads(run.stdout).values()
    phases, operators = entry["phases"], entry["operators"]
    assert phases["steps"] >= 4 and phases["output_tok_s"] > 0
    assert sum(phases["shares"].values()) == pytest.approx(1.0)
    assert phases["shares"]["model runner"] > 0.5  # a forward dominates a step of the bundled model
    assert set(operators["shares"]) == {"matmuls", "attention", "fused elementwise kernels", "other torch operators",
                                        "Python and dispatch"}
    assert operators["shares"]["matmuls"] > 0 and operators["shares"]["attention"] > 0


def test_profile_bench_decode_only_times_decode_steps_alone():
    run = subprocess.run([sys.executable, "-m", "lmport.bridge.cli", "bench", "profile", "--batch", "3",
                          "--max-tokens", "5", "--decode-only", "--json"], capture_output=True, text=True,
                         timeout=300, check=True)
    [entry] = json.loads(run.stdout).values()
    # the prefill step made each request's first token before timing: 4 decode steps of 3 sequences remain
    assert entry["phases"]["steps"] == 4
    assert entry["phases"]["output_tok_s"] > 0
    # decode steps run on the C++ decode stack, whose kernels carry the profiler labels of their Python wrappers
    shares = entry["operators"]["shares"]
    assert shares["attention"] > 0 and shares["fused elementwise kernels"] > 0 and shares["matmuls"] > 0


def test_peers_bench_without_its_venv_says_how_to_build_it(tmp_path):
    run = subprocess.run([sys.executable, "-m", "lmport.bridge.cli", "bench", "peers", "--peer-python",
                          str(tmp_path / "missing" / "python")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "run `make bench-peers`" in run.stderr


def test_quality_bench_reports_perplexity_and_agreement_for_each_method():
    run = subprocess.run([sys.executable, "-m", "lmport.bridge.cli", "bench", "quality", "--methods", "int8",
                          "--kv-cache-dtypes", "fp8", "--max-tokens", "2", "--json"], capture_output=True, text=True,
                         timeout=600, check=True)
    result = json.loads(run.stdout)
    assert result["tokens"] > 500  # the shipped text, read from package data
    assert set(result["rows"]) == {"bf16", "int8", "bf16, fp8 KV cache"}
    assert 1 < result["rows"]["bf16"]["perplexity"] < 100
    for variant in ("int8", "bf16, fp8 KV cache"):
        assert abs(result["rows"][variant]["perplexity"] / result["rows"]["bf16"]["perplexity"] - 1) < 0.1
        assert 0 <= result["rows"][variant]["greedy_agreement"] <= 1


def test_peers_serve_budgets_are_sides_compared_with_vllm(tmp_path):
    """`--serve-budget` adds one lmport server per budget; every lmport side gets a tok/s and a TTFT ratio."""
    import argparse

    from lmport.bridge import bench_peers

    parser = argparse.ArgumentParser()
    bench_peers.add_arguments(parser)
    args = parser.parse_args(["--workloads", "serve", "--serve-budget", "512", "--serve-budget", "1024"])
    sides = bench_peers._sides("serve", args, tmp_path / "python", tmp_path, tmp_path / "m.gguf", tmp_path)
    assert list(sides) == ["lmport", "lmport budget 512", "lmport budget 1024", "vllm"]
    summary = bench_peers._summarize({"serve": {
        "lmport": [{"output_tok_s": 300.0, "mean_ttft_ms": 3000.0}, {"output_tok_s": 330.0, "mean_ttft_ms": 2900.0}],
        "lmport budget 512": [{"output_tok_s": 240.0, "mean_ttft_ms": 1500.0}],
        "vllm": [{"output_tok_s": 300.0, "mean_ttft_ms": 2000.0}]}})["serve"]
    assert summary["lmport/vllm"] == pytest.approx(1.1) and summary["ttft lmport/vllm"] == pytest.approx(1.45)
    assert summary["lmport budget 512/vllm"] == pytest.approx(0.8)
    assert summary["ttft lmport budget 512/vllm"] == pytest.approx(0.75)


def test_peers_decode_runs_lmports_weight_forms_against_llamacpp_on_the_same_gguf(tmp_path):
    """The decode workload's sides: lmport in bf16, int8, int4 and on the GGUF's own codes (the exact weights
    llama.cpp runs), vLLM in bf16, llama.cpp on the file; `--no-llamacpp` leaves llama.cpp out."""
    import argparse

    from lmport.bridge import bench_peers

    parser = argparse.ArgumentParser()
    bench_peers.add_arguments(parser)
    sides = bench_peers._sides("decode", parser.parse_args(["--workloads", "decode"]), tmp_path / "python", tmp_path,
                               tmp_path / "m.gguf", tmp_path)
    assert list(sides) == ["lmport", "vllm", "lmport int8", "lmport int4", "lmport gguf", "llama.cpp (Q4_1)"]
    assert sides["lmport gguf"].args[0][-2:] == ["--quantization", "gguf"]
    without = bench_peers._sides("decode", parser.parse_args(["--no-llamacpp"]), tmp_path / "python", tmp_path,
                                 tmp_path / "m.gguf", tmp_path)
    assert "llama.cpp (Q4_1)" not in without
