"""Routed experts (Mixtral, Qwen3-MoE): a softmax router picks top_k experts per token, and the token's output is
the weighted sum of those experts' SiLU-gated MLPs.

The expert weights are stacked ([E, 2I, H] gate|up, [E, H, I] down, as transformers 5 holds them in memory). The
forward groups the step's (token, expert) pairs by expert and runs one pair of matmuls per active expert over all of
its tokens. Hand-written because torch has no grouped GEMM on CPU; a per-token loop would run top_k tiny matmuls per
token instead (docs/performance.md#moe-experts measures the difference).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lmport import kernels
from lmport.engine.models.layers import Linear, _param


class StackedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = _param(num_experts, 2 * intermediate_size, hidden_size)
        self.down_proj = _param(num_experts, hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H]; weights / expert_ids [T, top_k] -> [T, H]."""
        top_k = expert_ids.shape[1]
        flat_ids = expert_ids.flatten()
        order = flat_ids.argsort(stable=True)  # (token, slot) pairs grouped by expert, tokens ascending within
        counts = torch.bincount(flat_ids, minlength=self.gate_up_proj.shape[0]).tolist()
        flat_weights = weights.flatten()
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):  # ascending expert order: the sum adds up as transformers' does
            if count == 0:
                continue
            pairs = order[start:start + count]
            start += count
            tokens = pairs // top_k
            hidden = kernels.silu_and_mul(F.linear(x[tokens], self.gate_up_proj[expert]))
            hidden = F.linear(hidden, self.down_proj[expert]) * flat_weights[pairs, None]
            out.index_add_(0, tokens, hidden.to(out.dtype))
        return out


class SparseMoE(nn.Module):
    """Router (`gate`) + experts. renormalize: the top_k probabilities are rescaled to sum to 1 (Mixtral always;
    Qwen3-MoE per norm_topk_prob)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = Linear(hidden_size, [num_experts])
        self.experts = StackedExperts(num_experts, hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.experts(x, weights.to(x.dtype), expert_ids)


# checkpoint names of one expert's matrices: `<layer>.<moe>.experts.<i>.<proj>.weight`
_PER_EXPERT = re.compile(r"(?P<layer>.+)\.(?P<moe>mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\."
                         r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight")
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def stack_expert_weights(weights: Iterable[tuple[str, torch.Tensor]],
                         num_experts: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Hub checkpoints store each expert's matrices apart (Mixtral `block_sparse_moe.experts.<i>.w1|w3|w2`,
    Qwen3-MoE `mlp.experts.<i>.gate_proj|up_proj|down_proj`); yield them stacked under transformers 5's in-memory
    names (`mlp.experts.gate_up_proj` / `down_proj`) once a layer's set is complete. Other tensors pass through, with
    Mixtral's `block_sparse_moe` renamed `mlp`."""
    pending: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
    for name, tensor in weights:
        match = _PER_EXPERT.fullmatch(name)
        if match is None:
            yield name.replace(".block_sparse_moe.", ".mlp."), tensor
            continue
        layer = pending.setdefault(match["layer"], {})
        layer[(_ROLE[match["proj"]], int(match["expert"]))] = tensor
        if len(layer) == 3 * num_experts:
            del pending[match["layer"]]
            experts = range(num_experts)
            yield (f"{match['layer']}.mlp.experts.gate_up_proj",
                   torch.stack([torch.cat([layer[("gate", e)], layer[("up", e)]]) for e in experts]))
            yield f"{match['layer']}.mlp.experts.down_proj", torch.stack([layer[("down", e)] for e in experts])
    # an incomplete layer is left out: load_checkpoint then reports its stacked tensors as missing
