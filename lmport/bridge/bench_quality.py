"""`lmport bench quality`: what weight-only quantization and an fp8 KV cache cost in accuracy, measured, not assumed.

For the bundled model in bf16, under each `quantization` method and with each fp8 `kv_cache_dtype`: the perplexity of a fixed English text shipped
with lmport (lmport/bridge/data/quality.txt, ~570 words), from the engine's prompt logprobs; and greedy agreement
with bf16: the share of generated positions (a few prompts x 64 tokens) whose token equals bf16's. With
`--peer-python` (the `make bench-peers` venv) llama.cpp's perplexity on the bundled Q4_1 GGUF over the same token
ids is reported beside them. Note that the bundled model itself is a Q4_1 GGUF: lmport's bf16 is its exact
de-quantization, and int8/int4 re-quantize that.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

AGREEMENT_PROMPTS = ("The history of the printing press begins", "def quicksort(items):",
                     "Three things every new gardener should know:", "The weather in the mountains changed",
                     "Dear hiring manager,")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", default="int8,int4,gguf", help="quantization methods besides bf16 (default "
                        "%(default)s)")
    parser.add_argument("--group-size", type=int, default=32, help="int4 quantization_group_size")
    parser.add_argument("--kv-cache-dtypes", default="fp8_e4m3,fp8_e5m2", help="kv_cache_dtype values besides auto, "
                        "each with bf16 weights (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per agreement prompt")
    parser.add_argument("--peer-python", default=None, help="Python of the peers venv, for llama.cpp's perplexity")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def quality_text() -> str:
    return resources.files("lmport.bridge").joinpath("data/quality.txt").read_text()


def run(args: argparse.Namespace) -> int:
    from lmport.engine import LLM, SamplingParams

    text = quality_text()
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    rows: dict[str, dict[str, Any]] = {}
    reference: list[list[int]] = []
    token_ids: list[int] = []
    variants: dict[str, dict[str, Any]] = {"bf16": {}}
    for method in _names(args.methods):
        variants[method] = {"quantization": method, "quantization_group_size": args.group_size}
    for kv_dtype in _names(args.kv_cache_dtypes):
        variants[f"bf16, {kv_dtype} KV cache"] = {"kv_cache_dtype": kv_dtype}
    for name, options in variants.items():
        with LLM("smollm2", dtype="bfloat16", max_model_len=2048, **options) as llm:
            [scored] = llm.generate([text], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
            token_ids = scored.prompt_token_ids
            logprobs = [position[token].logprob for position, token in
                        zip(scored.prompt_logprobs[1:], token_ids[1:])]
            outputs = [o.outputs[0].token_ids for o in llm.generate(list(AGREEMENT_PROMPTS), greedy, use_tqdm=False)]
        rows[name] = {"perplexity": math.exp(-sum(logprobs) / len(logprobs))}
        if not options:
            reference = outputs
        else:
            same = sum(a == b for out, ref in zip(outputs, reference) for a, b in zip(out, ref))
            rows[name]["greedy_agreement"] = same / sum(len(ref) for ref in reference)
    if args.peer_python:
        rows["llama.cpp (Q4_1 GGUF)"] = {"perplexity": _llamacpp_perplexity(args.peer_python, token_ids)}
    result = {"tokens": len(token_ids), "rows": rows}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"perplexity over {len(token_ids)} tokens of lmport/bridge/data/quality.txt; greedy agreement with bf16 "
          f"over {len(AGREEMENT_PROMPTS)} prompts x {args.max_tokens} tokens")
    for name, row in rows.items():
        agreement = f"{100 * row['greedy_agreement']:6.1f} %" if "greedy_agreement" in row else "      -"
        print(f"  {name:30s} perplexity {row['perplexity']:7.3f}   agreement {agreement}")
    return 0


def _names(csv: str) -> list[str]:
    return [name.strip() for name in csv.split(",") if name.strip()]


def _llamacpp_perplexity(peer_python: str, token_ids: list[int]) -> float:
    from lmport.bridge.bench_peers import PEER_RUNNER
    from lmport.engine.gguf_convert import bundled_gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokens_file = Path(tmp) / "tokens.json"
        tokens_file.write_text(json.dumps(token_ids))
        done = subprocess.run([peer_python, "-P", str(PEER_RUNNER), "llamacpp-perplexity", "--model",
                               str(bundled_gguf()), "--prompts", str(tokens_file), "--max-tokens", "0"],
                              capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["perplexity"]
