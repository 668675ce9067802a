"""`lmport bench bridge`: what the stdio bridge costs.

1. ping round-trip latency (p50/p99) through the Python shim, one call at a time;
2. sustained request rate: several threads pinging through one shim for a fixed time;
3. the engine throughput workload of `lmport bench throughput` (same prompts and flags) run in-process with
   engine.LLM and through a worker (one concurrent generate call per prompt) in the same run, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from lmport.bridge.bench import add_workload_arguments, engine_throughput, make_prompts
from lmport.bridge.client import Client


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_workload_arguments(parser)
    parser.add_argument("--pings", type=int, default=2000, help="sequential pings for the latency percentiles")
    parser.add_argument("--rate-seconds", type=float, default=3.0, help="duration of the sustained-rate run")
    parser.add_argument("--rate-threads", type=int, default=8, help="threads calling at once in the rate run")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate in-process and worker runs this many times; the median ratio is reported "
                             "(a shared machine's load drifts)")
    parser.add_argument("--skip-engine", action="store_true", help="only the ping latency and rate")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # the worker gets the in-process thread budget
    result: dict[str, Any] = {}
    with Client.spawn(env=env) as client:
        result["ping"] = ping_latency(client, args.pings)
        result["rate"] = request_rate(client, args.rate_seconds, args.rate_threads)
    if not args.skip_engine:
        import torch

        torch.set_num_threads(args.threads)
        prompts = make_prompts(args.num_prompts, args.min_prompt_len, args.max_prompt_len, args.seed)
        result["workload"] = {"num_prompts": args.num_prompts, "max_tokens": args.max_tokens, "dtype": args.dtype,
                              "threads": args.threads, "model": args.model}
        rounds = []
        for i in range(args.rounds):  # alternate which side runs first
            sides = [("in_process", lambda: engine_throughput(args.model, prompts, args.max_tokens, args.dtype)),
                     ("worker", lambda: worker_throughput(env, args.model, prompts, args.max_tokens, args.dtype))]
            measured = {name: measure() for name, measure in (sides if i % 2 == 0 else sides[::-1])}
            measured["ratio"] = measured["worker"]["output_tok_s"] / measured["in_process"]["output_tok_s"]
            rounds.append(measured)
        result["rounds"] = rounds
        result["ratio"] = statistics.median(r["ratio"] for r in rounds)
    if args.json:
        print(json.dumps(result))
        return 0
    ping, rate = result["ping"], result["rate"]
    print(f"ping through the shim:  p50 {ping['p50_ms']:.3f} ms  p99 {ping['p99_ms']:.3f} ms  "
          f"({ping['count']} sequential calls)")
    print(f"sustained rate:         {rate['requests_per_s']:.0f} requests/s ({rate['threads']} threads, "
          f"{rate['seconds']:.1f} s)")
    if "ratio" in result:
        print(f"workload: {args.num_prompts} prompts x {args.max_tokens} greedy tokens (ignore_eos), {args.dtype}, "
              f"{args.threads} threads")
        for i, r in enumerate(result["rounds"], start=1):
            print(f"round {i}: in-process engine.LLM {r['in_process']['output_tok_s']:8.1f} output tok/s "
                  f"({r['in_process']['seconds']:.1f} s); through the worker {r['worker']['output_tok_s']:8.1f} "
                  f"output tok/s ({r['worker']['seconds']:.1f} s); ratio {r['ratio']:.3f}")
        print(f"ratio (worker / in-process), median of {len(result['rounds'])}: {result['ratio']:.3f}")
    return 0


def ping_latency(client: Client, count: int) -> dict[str, Any]:
    for i in range(min(200, count)):  # warm-up
        client.ping(i)
    samples = []
    for i in range(count):
        start = time.perf_counter()
        client.ping(i)
        samples.append(time.perf_counter() - start)
    samples.sort()
    return {"count": count, "p50_ms": 1000 * statistics.median(samples),
            "p99_ms": 1000 * samples[min(count - 1, int(count * 0.99))], "mean_ms": 1000 * statistics.fmean(samples)}


def request_rate(client: Client, seconds: float, threads: int) -> dict[str, Any]:
    done = [0] * threads
    stop = time.perf_counter() + seconds

    def loop(slot: int) -> None:
        while time.perf_counter() < stop:
            client.ping(slot)
            done[slot] += 1

    elapsed = _timed_threads(loop, threads)
    return {"threads": threads, "seconds": elapsed, "requests": sum(done), "requests_per_s": sum(done) / elapsed}


def _timed_threads(target: Callable[[int], None], count: int) -> float:
    """Run target(0..count-1) on that many threads at once; seconds from the first start to the last join."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def worker_throughput(env: dict[str, str], model: str, prompts: list[str], max_tokens: int,
                      dtype: str) -> dict[str, Any]:
    """The same workload as engine_throughput, as one generate call per prompt, all in flight at once."""
    params = {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True}
    with Client.spawn(env=env) as client:
        llm = client.llm(model, dtype=dtype)
        client.generate(llm, prompts[:2], {"temperature": 0.0, "max_tokens": 4})  # warm-up, as in-process
        outputs: list[Any] = [None] * len(prompts)

        def call(i: int) -> None:
            outputs[i] = client.generate(llm, prompts[i], params)[0]

        seconds = _timed_threads(call, len(prompts))
        tokens = sum(len(o["outputs"][0]["token_ids"]) for o in outputs)
        return {"seconds": seconds, "output_tokens": tokens, "output_tok_s": tokens / seconds}
