"""`lmport bench tp`: batch-1 decode latency at tensor_parallel_size 1 vs N (docs/scaling.md#tensor-parallelism).

Each (tensor_parallel_size, round) runs in a fresh process, alternating A B A B, so every run starts with the same
thread settings (a tensor-parallel engine gives each rank its share of the cores). The latency is one request's
(last token time - first token time) / (tokens - 1): decode steps only, the prefill excluded; the median counts.

Without --model it measures a synthetic Llama (random weights, the bundled SmolLM2 tokenizer) of --shape, cached
under ~/.cache/lmport: the bundled SmolLM2-135M itself has 9 heads and 3 KV heads, which do not split 2 ways.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

# name -> LlamaConfig sizes: "135m" is SmolLM2-135M with 8 heads / 4 KV heads instead of 9 / 3, "1b" TinyLlama's
SHAPES: dict[str, dict[str, int]] = {
    "135m": {"hidden_size": 576, "num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 1536,
             "num_hidden_layers": 30},
    "1b": {"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 8, "intermediate_size": 5632,
           "num_hidden_layers": 22},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="a model whose heads split (default: a synthetic --shape)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="135m", help="synthetic model's sizes")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor_parallel_size values")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="torch threads of the "
                        "tensor_parallel_size=1 runs, one run each (default: every core); larger sizes give each "
                        "rank cores // size")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child's run: "tp:threads"


def synthetic_model(shape: str) -> Path:
    """A random-weight Llama of SHAPES[shape] with SmolLM2's tokenizer (vocab 49152), written once."""
    path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmport" / f"bench-tp-{shape}"
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lmport.engine.loader import resolve_model

    tokenizer_dir = resolve_model("smollm2")
    config = LlamaConfig(vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, rms_norm_eps=1e-5, rope_theta=100000.0, **SHAPES[shape])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, tmp / name)
    tmp.rename(path)
    return path


def measure(model: str, tp: int, threads: int, dtype: str, max_tokens: int) -> dict[str, Any]:
    import torch

    from lmport.engine import LLM, SamplingParams

    torch.set_num_threads(threads)  # tp > 1 replaces it with each rank's share
    with LLM(model, dtype=dtype, tensor_parallel_size=tp, max_model_len=512, kv_cache_memory_bytes=256 << 20) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        llm.generate("warm up", SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
        out = llm.generate("The river carried small boats past quiet towns", params, use_tqdm=False)[0]
        metrics, n = out.metrics, len(out.outputs[0].token_ids)
        return {"tp": tp, "threads": torch.get_num_threads(), "decode_ms": (metrics.last_token_time - metrics.first_token_time) / (n - 1) * 1000,
                "tokens": n}


def run(args: argparse.Namespace) -> int:
    model = args.model or str(synthetic_model(args.shape))
    if args.one is not None:
        tp, threads = map(int, args.one.split(":"))
        print(json.dumps(measure(model, tp, threads, args.dtype, args.max_tokens)))
        return 0
    cores = len(os.sched_getaffinity(0))
    runs = [(tp, threads) for tp in args.tp for threads in ((args.threads or [cores]) if tp == 1 else [cores // tp])]
    samples: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for tp, threads in runs:
            child = subprocess.run([sys.executable, "-m", "lmport.bridge.cli", "bench", "tp", "--model", model,
                                    "--dtype", args.dtype, "--max-tokens", str(args.max_tokens),
                                    "--one", f"{tp}:{threads}"], check=True, capture_output=True, text=True)
            measured = json.loads(child.stdout.strip().splitlines()[-1])
            label = f"tp={tp}, {measured['threads']} thread(s) per rank"
            samples.setdefault(label, []).append(measured["decode_ms"])
    result = {"model": args.model or f"synthetic {args.shape}", "dtype": args.dtype, "max_tokens": args.max_tokens,
              "cores": cores, "rounds": args.rounds, "load_average": os.getloadavg()[0],
              "decode_ms": {label: statistics.median(v) for label, v in samples.items()}, "samples_ms": samples}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"batch-1 decode, {result['model']}, {args.dtype}, {result['cores']} cores, median of {args.rounds}:")
    for label, ms in result["decode_ms"].items():
        print(f"  {label:32} {ms:8.2f} ms/token ({1000 / ms:6.1f} tok/s)")
    return 0
