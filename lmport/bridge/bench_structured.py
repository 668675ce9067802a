"""`lmport bench structured`: structured outputs measured three ways on one engine.

- conformance: 200 generations at temperature 1.0 over 10 JSON schemas (20 seeds each), every one parsed and
  validated with jsonschema; likewise regexes (fullmatch) and choices (membership);
- cost: the offline 64 x 128 workload with every request constrained, against the same workload free, alternating
  free / constrained for --rounds rounds (the best of each side counts: the machine is shared);
- latency: time to first token of one request with a schema never seen before (compiled on admission), with the
  same schema again (xgrammar's cache), and with no schema.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
import uuid
from typing import Any

from lmport.bridge.bench import add_workload_arguments, make_prompts

_TEXT = {"type": "string", "maxLength": 24}
SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("a person", {"type": "object", "properties": {"name": _TEXT, "age": {"type": "integer", "minimum": 0,
                                                                            "maximum": 120}},
                  "required": ["name", "age"]}),
    ("a book", {"type": "object", "properties": {"title": _TEXT, "year": {"type": "integer", "minimum": 1450,
                                                                            "maximum": 2030},
                                                 "tags": {"type": "array", "items": _TEXT, "maxItems": 3}},
                "required": ["title", "year", "tags"], "additionalProperties": False}),
    ("a traffic light", {"type": "object", "properties": {"color": {"enum": ["red", "amber", "green"]},
                                                          "seconds": {"type": "integer", "minimum": 1,
                                                                      "maximum": 90}},
                         "required": ["color", "seconds"]}),
    ("an address", {"type": "object", "properties": {
        "street": _TEXT, "city": _TEXT, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["street", "city", "zip"]}),
    ("an order", {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                             "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"]}}},
        "required": ["id", "items"]}),
    ("the weather", {"type": "object", "properties": {"celsius": {"type": "number", "minimum": -60, "maximum": 60},
                                                      "sunny": {"type": "boolean"}},
                     "required": ["celsius", "sunny"]}),
    ("a color as RGB", {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255},
                        "minItems": 3, "maxItems": 3}),
    ("a user account", {"type": "object", "properties": {
        "username": {"type": "string", "pattern": "^[a-z][a-z0-9_]{2,11}$"},
        "role": {"enum": ["admin", "editor", "viewer"]}, "active": {"type": "boolean"}},
        "required": ["username", "role", "active"], "additionalProperties": False}),
    ("a movie review", {"type": "object", "properties": {
        "movie": _TEXT, "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "author": {"type": "object", "properties": {"name": _TEXT, "verified": {"type": "boolean"}},
                   "required": ["name", "verified"]}},
        "required": ["movie", "stars", "author"]}),
    ("a list of up to four planets", {"type": "array", "maxItems": 4, "items": {
        "enum": ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]}}),
]
REGEXES = [r"\d{3}-\d{4}", r"[A-Z][a-z]{2,8}", r"(yes|no), because [a-z ]{1,30}\.", r"#[0-9a-f]{6}",
           r"\d{4}-\d{2}-\d{2}"]
CHOICES = [["yes", "no"], ["red", "green", "blue"], ["positive", "negative", "neutral"], ["A", "B", "C", "D"],
           ["cat", "dog", "bird", "fish", "other"]]
# The cost workload's schema: at least 64 integers, so a constrained request cannot end before 128 tokens.
COST_SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 64}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_workload_arguments(parser)
    parser.add_argument("--per-constraint", type=int, default=20, help="generations per schema, regex and choice")
    parser.add_argument("--rounds", type=int, default=2, help="free / constrained alternations of the cost run")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def conformance(llm: Any, count: int) -> dict[str, Any]:
    import jsonschema

    from lmport.engine import SamplingParams

    def run(prompts: list[str], constraints: list[dict[str, Any]]) -> list[list[Any]]:
        params = [SamplingParams(temperature=1.0, n=count, seed=1000 * i, max_tokens=256, structured_outputs=c)
                  for i, c in enumerate(constraints)]
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        return [o.outputs for o in llm.chat(conversations, params, use_tqdm=False)]

    def valid_json(text: str, schema: dict[str, Any]) -> bool:
        try:
            jsonschema.validate(json.loads(text), schema)
            return True
        except (ValueError, jsonschema.ValidationError):
            return False

    results: dict[str, Any] = {}
    groups = run([f"Reply with {what} as JSON." for what, _ in SCHEMAS], [{"json": s} for _, s in SCHEMAS])
    results["json"] = _tally(groups, [lambda t, s=s: valid_json(t, s) for _, s in SCHEMAS])
    groups = run([f"Reply with text matching {r}" for r in REGEXES], [{"regex": r} for r in REGEXES])
    results["regex"] = _tally(groups, [lambda t, r=r: re.fullmatch(r, t) is not None for r in REGEXES])
    groups = run([f"Pick one of: {', '.join(c)}." for c in CHOICES], [{"choice": c} for c in CHOICES])
    results["choice"] = _tally(groups, [lambda t, c=c: t in c for c in CHOICES])
    return results


def _tally(groups: list[list[Any]], checks: list[Any]) -> dict[str, Any]:
    total = sum(len(g) for g in groups)
    valid = sum(check(c.text) for g, check in zip(groups, checks) for c in g)
    stopped = sum(c.finish_reason == "stop" for g in groups for c in g)
    return {"generations": total, "valid": valid, "finished_stop": stopped,
            "mean_tokens": statistics.fmean(len(c.token_ids) for g in groups for c in g)}


def cost(llm: Any, prompts: list[str], max_tokens: int, rounds: int) -> dict[str, Any]:
    from lmport.engine import SamplingParams

    free = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    constrained = free.clone(structured_outputs={"json": COST_SCHEMA})
    rates: dict[str, list[float]] = {"free": [], "constrained": []}
    for _ in range(rounds):
        for name, params in (("free", free), ("constrained", constrained)):
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            rates[name].append(sum(len(o.outputs[0].token_ids) for o in outputs) / seconds)
    best = {name: max(values) for name, values in rates.items()}
    return {"output_tok_s": rates, "best_free": best["free"], "best_constrained": best["constrained"],
            "ratio": best["constrained"] / best["free"]}


def compile_latency(llm: Any, repeats: int = 5) -> dict[str, float]:
    from lmport.engine import SamplingParams

    def ttft(structured_outputs: dict[str, Any] | None) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=1, structured_outputs=structured_outputs)
        start = time.perf_counter()
        llm.generate("Reply as JSON:", params, use_tqdm=False)
        return time.perf_counter() - start

    def fresh_schema() -> dict[str, Any]:  # a property name never seen: xgrammar's cache cannot have it
        return {**SCHEMAS[4][1], "properties": {**SCHEMAS[4][1]["properties"], f"p{uuid.uuid4().hex}": _TEXT}}

    seen = fresh_schema()
    ttft({"json": seen})
    samples = {"none": [ttft(None) for _ in range(repeats)],
               "new_schema": [ttft({"json": fresh_schema()}) for _ in range(repeats)],
               "cached_schema": [ttft({"json": seen}) for _ in range(repeats)]}
    medians = {name: statistics.median(values) * 1000 for name, values in samples.items()}
    return {**{f"ttft_ms_{k}": v for k, v in medians.items()},
            "added_ms_new_schema": medians["new_schema"] - medians["none"],
            "added_ms_cached_schema": medians["cached_schema"] - medians["none"]}


def run(args: argparse.Namespace) -> int:
    import torch

    from lmport.engine import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    prompts = make_prompts(args.num_prompts, args.min_prompt_len, args.max_prompt_len, args.seed)
    with LLM(args.model, dtype=args.dtype) as llm:
        llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
        result = {"workload": {"model": args.model, "dtype": args.dtype, "threads": args.threads,
                               "num_prompts": args.num_prompts, "max_tokens": args.max_tokens},
                  "latency": compile_latency(llm),
                  "conformance": conformance(llm, args.per_constraint),
                  "cost": cost(llm, prompts, args.max_tokens, args.rounds)}
    if args.json:
        print(json.dumps(result))
        return 0
    for kind, tally in result["conformance"].items():
        print(f"conformance {kind:7s} {tally['valid']:4d} / {tally['generations']} valid "
              f"({tally['finished_stop']} finished 'stop', {tally['mean_tokens']:.1f} tokens on average)")
    c = result["cost"]
    print(f"cost: {args.num_prompts} x {args.max_tokens} tokens, free {c['best_free']:.1f} tok/s, constrained "
          f"{c['best_constrained']:.1f} tok/s: ratio {c['ratio']:.2f}x (best of {args.rounds})")
    lat = result["latency"]
    print(f"latency: TTFT {lat['ttft_ms_none']:.1f} ms free, +{lat['added_ms_new_schema']:.1f} ms with a new "
          f"schema, +{lat['added_ms_cached_schema']:.1f} ms with a cached one")
    return 0
