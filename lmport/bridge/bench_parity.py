"""`lmport bench parity`: greedy tokens of this engine vs HF transformers' `generate`, prompt by prompt, on one device.

Both sides decode greedily for exactly --max-tokens tokens (EOS masked), HF one prompt at a time so that padding
plays no part. In float32 the tokens must match exactly; in bfloat16/float16 the two implementations round
differently and a near-tie between two logits eventually flips, so the report says how far each prompt agrees.
Exit status 1 when a float32 run differs (the engine's fp32 parity is a correctness claim, not a statistic).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

PROMPTS = [
    "The capital of France is",
    "Explain in one sentence why the sky is blue.",
    "def quicksort(items):",
    "Write a short poem about a lighthouse.",
    "List three uses of copper:",
    "The theory of relativity says that",
    "Translate to French: Good morning, how are you?",
    "Once upon a time, a fox and a crow",
    "What is 17 multiplied by 23?",
    "A good breakfast should include",
    "The main causes of the French Revolution were",
    "import numpy as np\n\ndef normalize(x):",
    "Summer in the mountains is",
    "Give two tips for writing clear documentation.",
    "The largest planet in the solar system",
    "Photosynthesis converts",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda[:N]'")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--num-prompts", type=int, default=len(PROMPTS), choices=range(1, len(PROMPTS) + 1),
                        metavar=f"1..{len(PROMPTS)}")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--enforce-eager", action="store_true", help="engine without CUDA graphs")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    prompts = PROMPTS[:args.num_prompts]
    result = compare(args.model, prompts, args.max_tokens, args.dtype, args.device, args.enforce_eager)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{len(prompts)} prompts x {args.max_tokens} greedy tokens, {args.dtype} on {result['device']} "
              f"({result['seconds']:.1f} s); identical prompts, and tokens before the first difference:")
        for pair, agreement in result["agreement"].items():
            print(f"  {pair:28} {agreement['identical']:3}/{len(prompts)}   "
                  f"{agreement['matched_tokens']:5}/{agreement['total_tokens']}")
        for prompt, first in zip(prompts, result["agreement"]["lmport vs hf"]["first_difference"]):
            if first is not None:
                print(f"  lmport and hf differ from token {first}: {prompt!r}")
    same = result["agreement"]["lmport vs hf"]["identical"]
    return 1 if args.dtype == "float32" and same < len(prompts) else 0


def compare(model: str, prompts: list[str], max_tokens: int, dtype: str, device: str,
            enforce_eager: bool) -> dict[str, Any]:
    """Agreement of the engine with HF in the same dtype; below float32 also of both with HF in float32, the
    reference that tells rounding noise from a bug (the engine should be about as close to it as HF is)."""
    from lmport.engine import LLM, SamplingParams

    start = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens)
    with LLM(model, dtype=dtype, device=device, enforce_eager=enforce_eager) as llm:
        ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        path, resolved = llm.engine.model_path, str(llm.engine.device)
    hf = hf_greedy(path, prompts, max_tokens, dtype, resolved)
    agreement = {"lmport vs hf": agreement_of(ours, hf, max_tokens)}
    if dtype != "float32":
        hf32 = hf_greedy(path, prompts, max_tokens, "float32", resolved)
        agreement["lmport vs hf float32"] = agreement_of(ours, hf32, max_tokens)
        agreement["hf vs hf float32"] = agreement_of(hf, hf32, max_tokens)
    return {"device": resolved, "dtype": dtype, "max_tokens": max_tokens, "agreement": agreement,
            "seconds": time.perf_counter() - start}


def hf_greedy(path: str, prompts: list[str], max_tokens: int, dtype: str, device: str) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
            out = model.generate(ids, do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 pad_token_id=tokenizer.eos_token_id)
            outputs.append(out[0, ids.shape[1]:].tolist())
    return outputs


def agreement_of(a: list[list[int]], b: list[list[int]], max_tokens: int) -> dict[str, Any]:
    first = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), None) for p, q in zip(a, b)]
    return {"identical": first.count(None), "first_difference": first,
            "matched_tokens": sum(max_tokens if f is None else f for f in first), "total_tokens": max_tokens * len(a)}
