"""Logit parity of the native paged models against transformers' own implementations (tiny random configs, fp32).

Each case runs the checks of tests/model_family_checks.py: paged logits (chunked/mixed prefill, decode) against
HF's forward, and for some, the engine's greedy tokens and seeded sampling from a saved directory."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

from tests.model_family_checks import (build_hf, build_pair, check_engine_greedy_and_seeded, check_paged_logits,
                                       save_model_dir)

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.2)

# the engine checks load a saved directory with the byte-level test tokenizer (260 ids)
ENGINE_VOCAB = dict(vocab_size=260, bos_token_id=258, eos_token_id=259, pad_token_id=257)

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
    # windows shorter than the prompts (11 tokens) and than the block size (4) or not aligned to it
    "mistral_window_3": (MistralConfig, dict(sliding_window=3)),
    "mistral_window_6_mha": (MistralConfig, dict(sliding_window=6, num_key_value_heads=4)),
    "qwen2_window_upper_layers": (Qwen2Config, dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=5,
                                                    max_window_layers=1)),
    "qwen2_bias_tied": (Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen2_rope_yarn": (Qwen2Config, dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                               original_max_position_embeddings=32))),
}


def config_of(case: str, **extra: object) -> PretrainedConfig:
    config_cls, overrides = CASES[case]
    return config_cls(**{**BASE, **overrides, **extra})


@pytest.mark.parametrize("case", list(CASES))
def test_paged_logits_match_transformers(case: str) -> None:
    check_paged_logits(*build_pair(config_of(case)))


@pytest.mark.parametrize("case", ["llama_mha_bias_tied", "mistral_head_dim", "qwen2_rope_yarn", "mistral_window_3",
                                  "qwen2_window_upper_layers"])
def test_engine_greedy_and_seeded_sampling_match(case: str, tmp_path) -> None:
    hf = build_hf(config_of(case, **ENGINE_VOCAB))
    check_engine_greedy_and_seeded(hf, save_model_dir(hf, tmp_path))


def test_fused_projections_hold_the_checkpoint_matrices() -> None:
    hf, ours = build_pair(config_of("qwen2_bias_tied"))
    attn, mlp = ours.model.layers[1].self_attn, ours.model.layers[1].mlp
    hf_attn, hf_mlp = hf.model.layers[1].self_attn, hf.model.layers[1].mlp
    q, k, v = attn.qkv_proj.weight.split(attn.qkv_proj.output_sizes)
    assert torch.equal(q, hf_attn.q_proj.weight) and torch.equal(k, hf_attn.k_proj.weight)
    assert torch.equal(v, hf_attn.v_proj.weight)
    assert torch.equal(attn.qkv_proj.bias[attn.q_size:attn.q_size + attn.kv_size], hf_attn.k_proj.bias)
    assert torch.equal(mlp.gate_up_proj.weight[96:], hf_mlp.up_proj.weight)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
