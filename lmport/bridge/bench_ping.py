"""`lmport bench ping`: the protocol `ping` round trip while a worker runs many generations, with engine_process
'off' (the model on a thread of the worker) and 'on' (the model in a child process), alternating A B A B.

Each side is a fresh worker (`Client.spawn`): load the model, warm up, start --generations concurrent generate
calls (greedy, ignore_eos, --max-tokens each), wait until the engine runs them all, then ping --pings times, one at
a time, --interval-ms apart, while they run. It reports the ping p50/p99/max, how many pings landed while every
generation was still running, and the generations' output tokens/s (first call to last answer), then the on/off
ratios (median over rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from typing import Any

from lmport.bridge.bench import make_prompts
from lmport.bridge.client import Client

MODES = ("off", "on")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (OMP_NUM_THREADS)")
    parser.add_argument("--generations", type=int, default=32, help="concurrent generate calls")
    parser.add_argument("--max-tokens", type=int, default=256, help="greedy tokens per generation (ignore_eos)")
    parser.add_argument("--stream", action="store_true", help="stream the generations (a chunk per token)")
    parser.add_argument("--pings", type=int, default=300, help="sequential pings per side")
    parser.add_argument("--interval-ms", type=float, default=10.0, help="pause between two pings")
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds (the first side alternates)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    prompts = make_prompts(args.generations, 16, 64, args.seed)
    rounds = []
    for i in range(args.rounds):
        order = MODES if i % 2 == 0 else MODES[::-1]
        measured = {mode: measure(env, mode, prompts, args) for mode in order}
        measured["p99_ratio"] = measured["on"]["p99_ms"] / measured["off"]["p99_ms"]
        measured["tok_s_ratio"] = measured["on"]["output_tok_s"] / measured["off"]["output_tok_s"]
        rounds.append(measured)
    result = {"workload": {"model": args.model, "dtype": args.dtype, "threads": args.threads,
                           "generations": args.generations, "max_tokens": args.max_tokens, "stream": args.stream,
                           "pings": args.pings, "interval_ms": args.interval_ms},
              "rounds": rounds,
              "p99_ratio": statistics.median(r["p99_ratio"] for r in rounds),
              "tok_s_ratio": statistics.median(r["tok_s_ratio"] for r in rounds)}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.generations} generations x {args.max_tokens} greedy tokens of {args.model} ({args.dtype}, "
          f"{args.threads} threads{', streamed' if args.stream else ''}); {args.pings} pings {args.interval_ms:g} ms "
          "apart during them")
    for i, r in enumerate(rounds, start=1):
        for mode in MODES:
            m = r[mode]
            print(f"round {i} engine_process={mode:3}: ping p50 {m['p50_ms']:6.2f} ms  p99 {m['p99_ms']:6.2f} ms  "
                  f"max {m['max_ms']:6.2f} ms  ({m['pings_all_running']}/{m['pings']} with all running)  "
                  f"{m['output_tok_s']:7.1f} output tok/s")
    print(f"on/off, median of {len(rounds)}: ping p99 {result['p99_ratio']:.3f}  output tok/s "
          f"{result['tok_s_ratio']:.3f}")
    return 0


def measure(env: dict[str, str], mode: str, prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    params = {"temperature": 0.0, "max_tokens": args.max_tokens, "ignore_eos": True}
    with Client.spawn(env=env) as client:
        llm = client.llm(args.model, dtype=args.dtype, engine_process=mode)
        client.generate(llm, prompts[:2], {"temperature": 0.0, "max_tokens": 4})  # warm-up
        for i in range(50):
            client.ping(i)
        tokens = [0] * len(prompts)

        def call(i: int) -> None:
            if args.stream:
                for chunk in client.generate(llm, prompts[i], params, stream=True):
                    tokens[i] += sum(len(o["token_ids"]) for o in chunk["outputs"])
            else:
                tokens[i] = len(client.generate(llm, prompts[i], params)[0]["outputs"][0]["token_ids"])

        threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(len(prompts))]
        start = time.perf_counter()
        for t in threads:
            t.start()
        while client.stats(llm)["num_running"] < len(prompts):  # every generation admitted and prefilled
            time.sleep(0.01)
        samples, all_running = [], 0
        for i in range(args.pings):
            began = time.perf_counter()
            client.ping(i)
            samples.append(time.perf_counter() - began)
            all_running += all(t.is_alive() for t in threads)
            time.sleep(args.interval_ms / 1000)
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
    samples.sort()
    return {"pings": len(samples), "pings_all_running": all_running,
            "p50_ms": 1000 * statistics.median(samples), "p99_ms": 1000 * samples[int(len(samples) * 0.99)],
            "max_ms": 1000 * samples[-1], "output_tokens": sum(tokens), "seconds": seconds,
            "output_tok_s": sum(tokens) / seconds}
