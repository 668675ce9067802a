"""`lmport bench peers`: lmport against vLLM's CPU build, and llama.cpp for batch-1 decode, on the same workloads.

Workloads (the issue's, docs/performance.md):
- offline: the `lmport bench throughput` prompts (64 x 128 greedy tokens, ignore_eos), lmport's LLM vs vllm.LLM;
- decode: batch-1 greedy decode of 256 tokens, lmport (bf16, int8, int4, gguf) vs vLLM (bf16) vs llama.cpp (the
  bundled Q4_1 GGUF itself; lmport's gguf side runs the same file's own codes, the others its bf16 conversion or a
  re-quantization of that);
- serve: vLLM's own `vllm bench serve` client (random dataset, 128 in / 64 out, 64 prompts, concurrency 32,
  ignore_eos) against `lmport serve` and `vllm serve` in turn.

Every measurement runs in a fresh process, rounds alternate A B A B (the machine is shared: only same-run ratios mean
much), and the best round of each side is compared. The peers live in their own venv (`make bench-peers` builds it:
vLLM's CPU wheel pins other versions of transformers and friends than lmport's lock).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmport.bridge.bench import make_prompts

PEER_RUNNER = Path(__file__).with_name("peer_runner.py")
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "4",
            "VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1"}
WORKLOADS = ("offline", "decode", "serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peer-python", default=".venv-peers/bin/python",
                        help="Python of the venv holding vllm-cpu and llama-cpp-python (default %(default)s)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of "
                        f"{', '.join(WORKLOADS)} (default: all)")
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds per workload (default %(default)s)")
    parser.add_argument("--num-prompts", type=int, default=64, help="offline prompts (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=128, help="offline tokens each (default %(default)s)")
    parser.add_argument("--decode-tokens", type=int, default=256, help="batch-1 decode tokens (default %(default)s)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--serve-budget", type=int, action="append", default=None, metavar="TOKENS",
                        help="serve: also run `lmport serve --max-num-batched-tokens TOKENS` (repeatable; its side "
                             "is named 'lmport budget TOKENS')")
    parser.add_argument("--no-llamacpp", action="store_true", help="leave llama.cpp out of the decode workload")
    parser.add_argument("--json", default=None, help="also write every measurement to this file")


def run(args: argparse.Namespace) -> int:
    from lmport.engine.gguf_convert import bundled_gguf, convert_gguf

    peer_python = Path(args.peer_python)
    if not peer_python.exists():
        print(f"lmport bench peers: no peers venv at {peer_python}: run `make bench-peers` (it builds it)",
              file=sys.stderr)
        return 2
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        print(f"lmport bench peers: unknown workload(s) {sorted(unknown)}; choose from {list(WORKLOADS)}",
              file=sys.stderr)
        return 2
    gguf = bundled_gguf()
    model_dir = convert_gguf(gguf)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="lmport-peers-") as tmp:
        for workload in workloads:
            sides = _sides(workload, args, peer_python, model_dir, gguf, Path(tmp))
            results[workload] = {name: [] for name in sides}
            for round_index in range(args.rounds):
                for name, measure in sides.items():
                    print(f"[{workload} round {round_index + 1}/{args.rounds}] {name} …", file=sys.stderr,
                          flush=True)
                    results[workload][name].append(measure())
    summary = _summarize(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "summary": summary}, indent=2))
    _print(summary)
    return 0


def _sides(workload: str, args: argparse.Namespace, peer_python: Path, model_dir: Path, gguf: Path,
           tmp: Path) -> dict[str, Any]:
    """name -> a no-argument callable that runs one measurement in a fresh process and returns its JSON."""
    if workload == "serve":
        sides = {"lmport": lambda: _serve_round("lmport", peer_python, model_dir, args.dtype, tmp)}
        for budget in args.serve_budget or []:
            sides[f"lmport budget {budget}"] = functools.partial(
                _serve_round, "lmport", peer_python, model_dir, args.dtype, tmp,
                ["--max-num-batched-tokens", str(budget)])
        return {**sides, "vllm": lambda: _serve_round("vllm", peer_python, model_dir, args.dtype, tmp)}
    count, tokens = (args.num_prompts, args.max_tokens) if workload == "offline" else (1, args.decode_tokens)
    prompts_file = tmp / f"{workload}-prompts.json"
    prompts_file.write_text(json.dumps(make_prompts(count, 16, 128, seed=0)))
    lmport_command = [sys.executable, "-m", "lmport.bridge.cli", "--log-level", "WARNING", "bench", "throughput",
                      "--skip-hf", "--json", "--num-prompts", str(count), "--max-tokens", str(tokens),
                      "--dtype", args.dtype]
    peer = [str(peer_python), "-P", str(PEER_RUNNER)]  # -P: lmport/bridge/http must not shadow the stdlib http
    common = ["--prompts", str(prompts_file), "--max-tokens", str(tokens), "--dtype", args.dtype]
    sides: dict[str, Any] = {
        "lmport": lambda: _json_run(lmport_command)["lmport"],
        "vllm": lambda: _json_run([*peer, "vllm-offline", "--model", str(model_dir), *common], VLLM_ENV),
    }
    if workload == "decode":
        # weight-only quantization against llama.cpp's 4-bit weights; gguf: lmport on the file's own Q4_1 codes
        for method in ("int8", "int4", "gguf"):
            sides[f"lmport {method}"] = functools.partial(
                lambda command: _json_run(command)["lmport"], [*lmport_command, "--quantization", method])
        if not args.no_llamacpp:
            sides["llama.cpp (Q4_1)"] = lambda: _json_run([*peer, "llamacpp-decode", "--model", str(gguf), *common])
    return sides


def _json_run(command: list[str], extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, **(extra_env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} … failed ({done.returncode}):\n{done.stderr[-3000:]}")
    # vLLM logs to stdout too, also after the result line: the result is the last line that is a JSON object.
    return json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _server(command: list[str], port: int, env: dict[str, str], log: Path) -> Iterator[None]:
    """Runs a server until its /health answers 200 (10 minutes at most), yields, then stops its process group."""
    import httpx

    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}); its log:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in 10 minutes; its log:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def _serve_round(side: str, peer_python: Path, model_dir: Path, dtype: str, tmp: Path,
                 server_args: list[str] | None = None) -> dict[str, Any]:
    """One `vllm bench serve` run (the issue's flags) against a freshly started server of `side` (lmport's with
    `server_args` added)."""
    port = _free_port()
    vllm_cli = [str(peer_python), "-m", "vllm.entrypoints.cli.main"]
    if side == "lmport":
        command = [sys.executable, "-m", "lmport.bridge.cli", "serve", "--model", "smollm2", "--dtype", dtype,
                   "--served-model-name", "smollm2", "--port", str(port), *(server_args or [])]
        env: dict[str, str] = {}
    else:
        command = [*vllm_cli, "serve", str(model_dir), "--dtype", dtype, "--served-model-name", "smollm2",
                   "--port", str(port), "--host", "127.0.0.1"]
        env = VLLM_ENV
    result_file = tmp / f"serve-{side}-{port}.json"
    with _server(command, port, env, tmp / f"serve-{side}-{port}.log"):
        client = [*vllm_cli, "bench", "serve", "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}",
                  "--model", "smollm2", "--tokenizer", str(model_dir), "--dataset-name", "random",
                  "--input-len", "128", "--output-len", "64", "--num-prompts", "64",
                  "--max-concurrency", "32", "--ignore-eos", "--save-result", "--result-dir", str(tmp),
                  "--result-filename", result_file.name]
        done = subprocess.run(client, capture_output=True, text=True, timeout=1800, env={**os.environ, **VLLM_ENV})
        if done.returncode != 0:
            raise RuntimeError(f"vllm bench serve against {side} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    data = json.loads(result_file.read_text())
    return {"output_tok_s": data["output_throughput"], "mean_ttft_ms": data["mean_ttft_ms"],
            "completed": data["completed"], "duration": data["duration"]}


def _summarize(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per workload: each side's best round (highest tok/s; serve also its TTFT of that round) and lmport's ratios."""
    summary: dict[str, Any] = {}
    for workload, sides in results.items():
        best = {name: max(runs, key=lambda r: r["output_tok_s"]) for name, runs in sides.items()}
        entry: dict[str, Any] = {"best": best}
        ours = [name for name in best if name.startswith("lmport")]
        for mine in ours:
            for peer in (name for name in best if name not in ours):
                entry[f"{mine}/{peer}"] = best[mine]["output_tok_s"] / best[peer]["output_tok_s"]
        if workload == "serve":
            for mine in ours:
                entry[f"ttft {mine}/vllm"] = best[mine]["mean_ttft_ms"] / best["vllm"]["mean_ttft_ms"]
        summary[workload] = entry
    return summary


def _print(summary: dict[str, Any]) -> None:
    for workload, entry in summary.items():
        print(f"{workload}:")
        for name, run in entry["best"].items():
            ttft = f", TTFT mean {run['mean_ttft_ms'] / 1000:.2f} s" if "mean_ttft_ms" in run else ""
            print(f"  {name:18s} {run['output_tok_s']:8.1f} output tok/s{ttft}")
        for key, value in entry.items():
            if key != "best":
                print(f"  {key:30s} {value:8.2f}x")
