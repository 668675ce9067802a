"""bf16 CPU weight pre-packing (oneDNN layout): same logits as the plain F.linear path, plain copies released."""

from __future__ import annotations

import pytest
import torch

from lmport.engine.models import LlamaForCausalLM
from lmport.engine.models.layers import Linear, pack_cpu_linears
from tests.model_harness import PagedHarness, PagedSeq, tiny_llama

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")


def bf16_model(tie: bool) -> LlamaForCausalLM:
    hf = tiny_llama(tie_word_embeddings=tie, attention_bias=True)  # biased projections pack too
    model = LlamaForCausalLM(hf.config)
    model.load_weights(hf.state_dict().items())
    return model.to(torch.bfloat16)


def run(model: LlamaForCausalLM) -> list[torch.Tensor]:
    harness, seqs = PagedHarness(model), [PagedSeq(), PagedSeq()]
    prompt = [3, 90, 17, 200, 45, 8, 8, 250, 1]
    outs = harness.step([(seqs[0], prompt), (seqs[1], prompt[:4])])
    outs += harness.step([(seqs[0], [5]), (seqs[1], [6])])
    return outs


@pytest.mark.parametrize("tie", [False, True])
def test_packed_linears_give_identical_logits(tie: bool) -> None:
    plain, packed = bf16_model(tie), bf16_model(tie)
    assert pack_cpu_linears(packed) == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and lm_head
    for want, got in zip(run(plain), run(packed)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    released = {name for name, m in packed.named_modules() if isinstance(m, Linear) and m.weight.numel() == 0}
    assert ("lm_head" in released) is not tie  # a tied lm_head keeps the embedding's weight
    assert "model.layers.0.self_attn.qkv_proj" in released


def test_float32_is_left_alone() -> None:
    hf = tiny_llama()
    model = LlamaForCausalLM(hf.config)
    model.load_weights(hf.state_dict().items())
    assert pack_cpu_linears(model) == 0
