"""`lmport bench embed`: embeddings/s of this engine (LLM.embed) against sentence-transformers' `encode` on the same
weights, in one process, alternating A B A B so that both see the same machine load; also the lowest cosine
similarity between the two sides' vectors (they must agree, or the rate means nothing)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from lmport.bridge.bench import make_prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="an encoder the engine and sentence-transformers "
                        "both load (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--num-texts", type=int, default=256)
    parser.add_argument("--min-words", type=int, default=8)
    parser.add_argument("--max-words", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3, help="A B rounds (each side runs once per round)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentence-transformers' batch size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer

    from lmport.engine import LLM

    torch.set_num_threads(args.threads)
    texts = make_prompts(args.num_texts, args.min_words, args.max_words, args.seed)
    with LLM(args.model, device=args.device) as llm:
        reference = SentenceTransformer(llm.engine.model_path, device=args.device)

        def lmport_side() -> torch.Tensor:
            return torch.tensor([o.embedding for o in llm.embed(texts, use_tqdm=False)])

        def st_side() -> torch.Tensor:
            return reference.encode(texts, batch_size=args.batch_size, convert_to_tensor=True).float().cpu()

        lmport_side(), st_side()  # warm-up: first-call allocations and kernel selection
        rates: dict[str, list[float]] = {"lmport": [], "sentence_transformers": []}
        vectors: dict[str, torch.Tensor] = {}
        for _ in range(args.rounds):
            for name, side in (("lmport", lmport_side), ("sentence_transformers", st_side)):
                start = time.perf_counter()
                vectors[name] = side()
                rates[name].append(len(texts) / (time.perf_counter() - start))
        model_path, dtype = llm.engine.model_path, str(llm.engine.dtype).removeprefix("torch.")
    cosine = F.cosine_similarity(vectors["lmport"], vectors["sentence_transformers"]).min().item()
    medians = {name: statistics.median(values) for name, values in rates.items()}
    result: dict[str, Any] = {
        "workload": {"model": args.model, "model_path": model_path, "num_texts": args.num_texts,
                     "words": [args.min_words, args.max_words], "device": args.device, "dtype": dtype,
                     "threads": args.threads, "rounds": args.rounds, "st_batch_size": args.batch_size},
        "embeddings_per_s": rates, "median_embeddings_per_s": medians,
        "ratio": medians["lmport"] / medians["sentence_transformers"], "min_cosine": cosine}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"workload: {args.num_texts} texts of {args.min_words}-{args.max_words} words, {args.model} ({dtype}) on "
          f"{args.device}, {args.threads} threads, {args.rounds} rounds A B A B")
    for name, label in (("lmport", "lmport LLM.embed:         "), ("sentence_transformers", "sentence-transformers:    ")):
        runs = ", ".join(f"{r:.1f}" for r in rates[name])
        print(f"{label}{medians[name]:8.1f} embeddings/s (median of {runs})")
    print(f"ratio (lmport / st):      {result['ratio']:8.2f}x")
    print(f"lowest cosine similarity: {cosine:.6f}")
    return 0
