"""Logit parity of the native paged models against transformers' own implementations (tiny random configs, fp32).

Each case runs chunked/mixed prefill of three prompts and then decode steps through the paged KV cache, and compares
every row with HF's full-sequence forward."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

from lmport.engine.models import get_model_class
from tests.model_harness import PagedHarness, PagedSeq

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.2)

CASES: dict[str, tuple[type[PretrainedConfig], dict]] = {
    "llama_gqa": (LlamaConfig, {}),
    "llama_mha_bias_tied": (LlamaConfig, dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True,
                                              tie_word_embeddings=True)),
    "llama_rope_llama3": (LlamaConfig, dict(num_key_value_heads=1, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama_rope_linear": (LlamaConfig, dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0,
                                                                 factor=2.0))),
    "mistral_head_dim": (MistralConfig, dict(head_dim=32, sliding_window=64)),
    "qwen2_bias_tied": (Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen2_rope_yarn": (Qwen2Config, dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                               original_max_position_embeddings=32))),
}


def build_pair(config_cls: type[PretrainedConfig], overrides: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    config = config_cls(**{**BASE, **overrides})
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise them so they are really tested
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.2)
    ours = get_model_class(hf.config)(hf.config)
    ours.load_weights(hf.state_dict().items())
    return hf, ours


@pytest.mark.parametrize("case", list(CASES))
def test_paged_logits_match_transformers(case: str) -> None:
    hf, ours = build_pair(*CASES[case])
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, BASE["vocab_size"], (n,), generator=gen).tolist() for n in (5, 11, 3)]
    harness = PagedHarness(ours)
    seqs = [PagedSeq() for _ in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]

    def run(work: list[tuple[int, list[int]]]) -> None:
        outs = harness.step([(seqs[i], new) for i, new in work])
        for (i, new), out in zip(work, outs):
            tokens[i] += new
            logits[i].append(out)

    run([(0, prompts[0]), (1, prompts[1][:6])])  # prefill + first chunk of a chunked prefill
    run([(1, prompts[1][6:]), (2, prompts[2]), (0, [7])])  # prefill after cached context, new prefill, a decode
    for step in range(4):
        run([(i, [int(torch.randint(0, BASE["vocab_size"], (), generator=gen))]) for i in range(3)])

    for i in range(3):
        with torch.no_grad():
            expected = hf(torch.tensor([tokens[i]])).logits[0]
        got = torch.cat(logits[i])
        assert got.shape == expected.shape
        assert expected.std() > 0.3, "logits too flat for the comparison to mean anything"
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_fused_projections_hold_the_checkpoint_matrices() -> None:
    hf, ours = build_pair(*CASES["qwen2_bias_tied"])
    attn, mlp = ours.model.layers[1].self_attn, ours.model.layers[1].mlp
    hf_attn, hf_mlp = hf.model.layers[1].self_attn, hf.model.layers[1].mlp
    q, k, v = attn.qkv_proj.weight.split(attn.qkv_proj.output_sizes)
    assert torch.equal(q, hf_attn.q_proj.weight) and torch.equal(k, hf_attn.k_proj.weight)
    assert torch.equal(v, hf_attn.v_proj.weight)
    assert torch.equal(attn.qkv_proj.bias[attn.q_size:attn.q_size + attn.kv_size], hf_attn.k_proj.bias)
    assert torch.equal(mlp.gate_up_proj.weight[96:], hf_mlp.up_proj.weight)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
