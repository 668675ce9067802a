"""`lmport bench serve`: load a running OpenAI-compatible server the way vLLM's serving benchmark does.

N requests (the same mixed-length prompts as `lmport bench throughput`, greedy, ignore_eos so every request makes
exactly max_tokens) are sent at a Poisson request rate (or all at once) with at most `--max-concurrency` in flight;
each streams, and the client times every chunk. Reports successful requests, duration, request and token
throughput, and TTFT, TPOT (per output token after the first), ITL (between chunks) and E2EL: mean, median, p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from lmport.bridge.bench import make_prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    parser.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    parser.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    parser.add_argument("--api-key", default=None, help="Bearer key, if the server wants one")
    parser.add_argument("--num-prompts", type=int, default=64, help="requests to send (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens each request generates (ignore_eos)")
    parser.add_argument("--min-prompt-len", type=int, default=16, help="shortest prompt, in words")
    parser.add_argument("--max-prompt-len", type=int, default=128, help="longest prompt, in words")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: all)")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="Poisson arrival rate in requests/s (default inf: send all at once)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and the arrival times")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


@dataclass(slots=True)
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)


async def _one(client: httpx.AsyncClient, endpoint: str, body: dict[str, Any]) -> RequestResult:
    result = RequestResult()
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", endpoint, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not _has_text(chunk):
                    continue
                now = time.perf_counter()
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        result.e2el = time.perf_counter() - start
        result.ok = result.output_tokens > 0
    except (httpx.HTTPError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _has_text(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices", []):
        if choice.get("text") or choice.get("delta", {}).get("content"):
            return True
    return False


async def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=None, limits=limits) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        prompts = make_prompts(args.num_prompts, args.min_prompt_len, args.max_prompt_len, args.seed)
        common = {"model": model, "max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True,
                  "stream": True, "stream_options": {"include_usage": True}}
        bodies = [{**common, "prompt": p} if args.endpoint == "/v1/completions" else
                  {**common, "messages": [{"role": "user", "content": p}]} for p in prompts]
        await _one(client, args.endpoint, {**bodies[0], "max_tokens": 4})  # warm-up (connection, first step)
        gate = asyncio.Semaphore(args.max_concurrency or len(bodies))
        rng = random.Random(args.seed)

        async def limited(body: dict[str, Any]) -> RequestResult:
            async with gate:
                return await _one(client, args.endpoint, body)

        start = time.perf_counter()
        tasks = []
        for body in bodies:
            tasks.append(asyncio.create_task(limited(body)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(results, duration, args, model)


def summarize(results: list[RequestResult], duration: float, args: argparse.Namespace,
              model: str) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    tpot = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    summary: dict[str, Any] = {
        "model": model, "endpoint": args.endpoint, "num_prompts": len(results), "max_tokens": args.max_tokens,
        "max_concurrency": args.max_concurrency, "request_rate": args.request_rate,
        "successful_requests": len(ok), "failed_requests": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "duration_s": duration, "total_input_tokens": prompt, "total_output_tokens": output,
        "request_throughput": len(ok) / duration, "output_throughput": output / duration,
        "total_token_throughput": (prompt + output) / duration,
    }
    for name, values in (("ttft", [r.ttft for r in ok]), ("tpot", tpot),
                         ("itl", [gap for r in ok for gap in r.itl]), ("e2el", [r.e2el for r in ok])):
        summary[f"mean_{name}_ms"] = statistics.fmean(values) * 1000 if values else 0.0
        summary[f"median_{name}_ms"] = statistics.median(values) * 1000 if values else 0.0
        summary[f"p99_{name}_ms"] = _percentile(values, 99) * 1000 if values else 0.0
    return summary


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def render(summary: dict[str, Any]) -> str:
    rows = [("Successful requests", f"{summary['successful_requests']}"),
            ("Failed requests", f"{summary['failed_requests']}"),
            ("Max concurrency", f"{summary['max_concurrency'] or 'unlimited'}"),
            ("Request rate (req/s)", f"{summary['request_rate']}"),
            ("Benchmark duration (s)", f"{summary['duration_s']:.2f}"),
            ("Total input tokens", f"{summary['total_input_tokens']}"),
            ("Total generated tokens", f"{summary['total_output_tokens']}"),
            ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{summary['output_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{summary['total_token_throughput']:.2f}")]
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        rows.append((f"-- {title} --", ""))
        for stat in ("mean", "median", "p99"):
            rows.append((f"{stat.capitalize()} {name.upper()} (ms)", f"{summary[f'{stat}_{name}_ms']:.2f}"))
    lines = ["============ Serving Benchmark Result ============"]
    lines += [f"{k:<42}{v:>10}" if v else k for k, v in rows]
    if summary["errors"]:
        lines.append(f"errors: {summary['errors']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would drown the report
    summary = asyncio.run(run_benchmark(args))
    print(json.dumps(summary) if args.json else render(summary))
    return 0 if summary["failed_requests"] == 0 else 1
