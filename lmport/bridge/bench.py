"""`lmport bench ...`: throughput here; `bridge`, `serve`, `parity` and `embed` live in modules of their own.

`lmport bench throughput` runs one offline workload on this engine and on HF transformers' padded batched
`generate` in the same process and prints both rates and their ratio (the machine is shared: only the ratio means
much).
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import sys
import time
from typing import Any

DELEGATED = {
    "bridge": ("lmport.bridge.bench_bridge", "ping latency and throughput through the stdio worker vs in-process"),
    "serve": ("lmport.bridge.http.bench", "load a running OpenAI-compatible server (like vLLM's serving benchmark)"),
    "parity": ("lmport.bridge.bench_parity", "greedy tokens: this engine vs HF transformers generate, prompt by prompt"),
    "profile": ("lmport.bridge.bench_profile", "where an engine step's time goes: phases, then operators"),
    "quality": ("lmport.bridge.bench_quality", "perplexity and greedy agreement: bf16 vs int8, int4, gguf, fp8 KV (vs llama.cpp)"),
    "peers": ("lmport.bridge.bench_peers", "lmport vs vLLM's CPU build and llama.cpp, same workloads, A B A B"),
    "embed": ("lmport.bridge.bench_embed", "embeddings/s: LLM.embed vs sentence-transformers, alternating A B A B"),
    "structured": ("lmport.bridge.bench_structured", "structured outputs: conformance, cost vs free, compile latency"),
    "moe": ("lmport.bridge.bench_moe", "routed experts: grouped by expert vs transformers' block vs a per-token loop"),
    "tp": ("lmport.bridge.bench_tp", "batch-1 decode latency: tensor_parallel_size 1 vs 2, A B A B"),
    "ping": ("lmport.bridge.bench_ping", "ping latency under concurrent generations: engine_process off vs on"),
}

_WORDS = ("the river carried small boats past quiet towns while engineers measured the water and wrote careful "
          "notes about pressure flow and the old stone bridges that had stood for centuries").split()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    throughput = sub.add_parser("throughput", help="offline throughput: this engine vs HF transformers generate")
    add_workload_arguments(throughput)
    throughput.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda[:N]': "
                            "both sides run there")
    throughput.add_argument("--enforce-eager", action="store_true",
                            help="engine without CUDA graphs or the CPU decode stack (module by module)")
    throughput.add_argument("--quantization", choices=["int8", "int4", "gguf"], default=None,
                            help="weight-only quantization of this engine (transformers stays in --dtype)")
    throughput.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
                            help="this engine's KV cache element type")
    throughput.add_argument("--engine-process", default="auto", choices=["auto", "on", "off"],
                            help="this engine's engine_process (on: the model in a child process)")
    throughput.add_argument("--skip-hf", action="store_true", help="measure only this engine")
    throughput.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    for name, (module, help_text) in DELEGATED.items():
        if name in sys.argv[1:]:  # import only what runs: the server's imports are heavy
            importlib.import_module(module).add_arguments(sub.add_parser(name, help=help_text))
        else:
            sub.add_parser(name, help=help_text)


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--min-prompt-len", type=int, default=16, help="shortest prompt, in words")
    parser.add_argument("--max-prompt-len", type=int, default=128, help="longest prompt, in words")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)


def make_prompts(num: int, min_len: int, max_len: int, seed: int) -> list[str]:
    """Deterministic prompts of mixed lengths (mixed lengths are what continuous batching is for)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(min_len, max_len))) for _ in range(num)]


def run(args: argparse.Namespace) -> int:
    if args.bench in DELEGATED:
        return int(importlib.import_module(DELEGATED[args.bench][0]).run(args) or 0)
    import torch

    torch.set_num_threads(args.threads)
    prompts = make_prompts(args.num_prompts, args.min_prompt_len, args.max_prompt_len, args.seed)
    result: dict[str, Any] = {"workload": {"num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
                                           "dtype": args.dtype, "threads": args.threads, "model": args.model,
                                           "kv_cache_dtype": args.kv_cache_dtype,
                                           "engine_process": args.engine_process}}
    result["lmport"] = engine_throughput(args.model, prompts, args.max_tokens, args.dtype, device=args.device,
                                         enforce_eager=args.enforce_eager, quantization=args.quantization,
                                         kv_cache_dtype=args.kv_cache_dtype, engine_process=args.engine_process)
    result["workload"]["device"] = result["lmport"]["device"]
    if not args.skip_hf:
        result["hf"] = hf_throughput(result["lmport"]["model_path"], prompts, args.max_tokens, args.dtype,
                                     result["lmport"]["device"])
        result["ratio"] = result["lmport"]["output_tok_s"] / result["hf"]["output_tok_s"]
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"workload: {args.num_prompts} prompts x {args.max_tokens} greedy tokens (ignore_eos), {args.dtype} "
          f"(KV cache {args.kv_cache_dtype}), "
          f"{args.threads} threads, on {result['workload']['device']}")
    graphed, stacked = result["lmport"]["cuda_graph_steps"], result["lmport"]["cpu_decode_stack_steps"]
    print(f"lmport engine:          {result['lmport']['output_tok_s']:8.1f} output tok/s "
          f"({result['lmport']['seconds']:.1f} s{f'; {graphed} decode steps from CUDA graphs' if graphed else ''}"
          f"{f'; {stacked} decode steps on the CPU decode stack' if stacked else ''})")
    if "hf" in result:
        print(f"transformers generate:  {result['hf']['output_tok_s']:8.1f} output tok/s "
              f"({result['hf']['seconds']:.1f} s)")
        print(f"ratio (lmport / hf):    {result['ratio']:8.2f}x")
    return 0


def engine_throughput(model: str, prompts: list[str], max_tokens: int, dtype: str,
                      **engine_options: Any) -> dict[str, Any]:
    from lmport.engine import LLM, SamplingParams

    with LLM(model, dtype=dtype, **engine_options) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        stats = llm.stats()  # one call: with engine_process="on" each is a round trip to the child
        return {"seconds": seconds, "output_tokens": tokens, "output_tok_s": tokens / seconds,
                "model_path": llm.engine.model_path, "device": str(llm.engine.device),
                **{key: stats[key] for key in ("cuda_graph_steps", "cpu_decode_stack_steps")}}


def hf_throughput(model_path: str, prompts: list[str], max_tokens: int, dtype: str,
                  device: str = "cpu") -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device).eval()
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    kwargs = dict(do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                  pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        model.generate(**tokenizer(prompts[:2], return_tensors="pt", padding=True).to(device), do_sample=False,
                       max_new_tokens=4, pad_token_id=tokenizer.pad_token_id)  # warm-up
        start = time.perf_counter()
        out = model.generate(**batch, **kwargs)
        out.tolist()  # waits for the device, like the engine's returned token lists
        seconds = time.perf_counter() - start
    tokens = int((out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0])
    return {"seconds": seconds, "output_tokens": tokens, "output_tok_s": tokens / seconds}
