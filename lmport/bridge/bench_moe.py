"""`lmport bench moe`: the routed-experts layer (lmport.engine.models.moe) on one step's tokens, three ways on the
same weights and router choices:

- grouped: lmport's path, (token, expert) pairs grouped by expert, one matmul pair per active expert;
- transformers: transformers' own MixtralSparseMoeBlock (its experts loop, the peer);
- per-token: each token's top_k experts one by one (what a straightforward implementation does).

Alternating A B C for --rounds rounds; the median of each counts. All three outputs are checked to agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256], help="tokens in the step")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _median_ms(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from lmport.engine.models.moe import SparseMoE

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    ours = SparseMoE(args.hidden, args.intermediate, args.experts, args.top_k, renormalize=True).to(dtype)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    config = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_local_experts=args.experts, num_experts_per_tok=args.top_k)
    theirs = MixtralSparseMoeBlock(config).to(dtype).eval()
    theirs.load_state_dict({"gate.weight": ours.gate.weight, "experts.gate_up_proj": ours.experts.gate_up_proj,
                            "experts.down_proj": ours.experts.down_proj})
    w13, w2 = ours.experts.gate_up_proj, ours.experts.down_proj

    def per_token(x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(ours.gate(x).float(), dim=-1)
        weights, ids = torch.topk(probs, args.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for slot in range(args.top_k):
                e = int(ids[t, slot])
                gate, up = torch.nn.functional.linear(x[t:t + 1], w13[e]).chunk(2, dim=-1)
                out[t] += (torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w2[e])[0]
                           * weights[t, slot])
        return out

    rows = []
    with torch.inference_mode():
        for tokens in args.tokens:
            x = torch.randn(tokens, args.hidden, dtype=dtype)
            sides = {"grouped": lambda: ours(x), "transformers": lambda: theirs(x[None])[0],
                     "per_token": lambda: per_token(x)}
            outputs = {name: fn().float() for name, fn in sides.items()}  # warm-up, and the agreement check
            scale = outputs["grouped"].abs().max().item()
            disagreement = max((o - outputs["grouped"]).abs().max().item() for o in outputs.values()) / scale
            times: dict[str, list[float]] = {name: [] for name in sides}
            for _ in range(args.rounds):
                for name, fn in sides.items():
                    times[name].append(_median_ms(fn, 1))
            medians = {name: statistics.median(t) for name, t in times.items()}
            rows.append({"tokens": tokens, "ms": medians, "max_rel_disagreement": disagreement,
                         "speedup_vs_transformers": medians["transformers"] / medians["grouped"],
                         "speedup_vs_per_token": medians["per_token"] / medians["grouped"]})
    result = {"shape": {"experts": args.experts, "top_k": args.top_k, "hidden": args.hidden,
                        "intermediate": args.intermediate, "dtype": args.dtype, "threads": args.threads},
              "rows": rows}
    if args.json:
        print(json.dumps(result))
        return 0
    for row in rows:
        ms = row["ms"]
        print(f"{row['tokens']:5d} tokens: grouped {ms['grouped']:8.2f} ms, transformers {ms['transformers']:8.2f} ms "
              f"({row['speedup_vs_transformers']:.2f}x), per-token {ms['per_token']:8.2f} ms "
              f"({row['speedup_vs_per_token']:.2f}x); outputs agree to {row['max_rel_disagreement']:.1e}")
    return 0
