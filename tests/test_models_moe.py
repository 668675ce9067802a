"""lmport.engine.models.moe: grouped experts against a per-token loop, and the per-expert checkpoint layouts."""

from __future__ import annotations

import pytest
import torch

from lmport.engine.models.moe import SparseMoE, stack_expert_weights


@pytest.mark.parametrize("top_k,renormalize,tokens", [(2, True, 37), (1, False, 5), (3, False, 1)])
def test_grouped_experts_match_a_per_token_loop(top_k: int, renormalize: bool, tokens: int) -> None:
    torch.manual_seed(top_k)
    moe = SparseMoE(32, 48, 6, top_k, renormalize)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(tokens, 32)
    probs = torch.softmax(x @ moe.gate.weight.T, dim=-1)
    expected = torch.zeros_like(x)
    for t in range(tokens):
        weights, ids = probs[t].topk(top_k)
        if renormalize:
            weights = weights / weights.sum()
        for w, e in zip(weights, ids):
            gate, up = (moe.experts.gate_up_proj[e] @ x[t]).chunk(2)
            expected[t] += w * (moe.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(moe(x), expected, atol=1e-5, rtol=1e-5)


def test_per_expert_checkpoint_tensors_are_stacked() -> None:
    w = {f"model.layers.0.block_sparse_moe.experts.{e}.{proj}.weight": torch.full((2, 3) if proj != "w2" else (3, 2),
                                                                                 float(10 * e + i))
         for e in range(2) for i, proj in enumerate(["w1", "w3", "w2"])}
    w["model.layers.0.block_sparse_moe.gate.weight"] = torch.zeros(2, 3)
    out = dict(stack_expert_weights(w.items(), num_experts=2))
    assert set(out) == {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj",
                        "model.layers.0.mlp.experts.down_proj"}
    gate_up = out["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (2, 4, 3) and gate_up[1, :2].eq(10).all() and gate_up[1, 2:].eq(11).all()
    assert out["model.layers.0.mlp.experts.down_proj"][0].eq(2).all()
    incomplete = dict(stack_expert_weights(list(w.items())[1:], num_experts=2))  # one expert matrix missing
    assert "model.layers.0.mlp.experts.gate_up_proj" not in incomplete
