"""Families beyond Llama/Mistral/Qwen2, against transformers on tiny random-init configs (fp32): paged logits
within 1e-4 through chunked prefill and decode, and from a saved directory through the engine, 32 greedy tokens
identical to `generate` and seeded sampling identical alone and in a batch of 16 (tests/model_family_checks.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, DynamicCache, PretrainedConfig

from tests.model_family_checks import PARITY_ATOL, build_hf, build_pair, check_engine_greedy_and_seeded, \
    check_paged_logits, save_model_dir
from tests.model_harness import PagedHarness, PagedSeq

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.2)
# the engine checks load a saved directory with the byte-level test tokenizer (260 ids)
ENGINE_VOCAB = dict(vocab_size=260, bos_token_id=258, eos_token_id=259, pad_token_id=257)
GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
               "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}}

CASES: dict[str, tuple[str, dict]] = {
    "qwen3_gqa_head_dim": ("qwen3", dict(head_dim=32)),
    "qwen3_tied_mha_bias": ("qwen3", dict(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True)),
    "qwen3_window": ("qwen3", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "olmo2_gqa": ("olmo2", dict()),
    "olmo2_mha_bias_tied": ("olmo2", dict(num_key_value_heads=4, attention_bias=True, tie_word_embeddings=True)),
    "granite_multipliers": ("granite", dict(embedding_multiplier=6.0, attention_multiplier=0.3,
                                            residual_multiplier=0.4, logits_scaling=2.5)),
    "granite_tied_mha": ("granite", dict(num_key_value_heads=4, tie_word_embeddings=True, embedding_multiplier=12.0,
                                         attention_multiplier=0.0625, residual_multiplier=0.22, logits_scaling=8.0)),
    # Phi-3: fused qkv / gate_up in the checkpoint, LongRoPE (within the original 64 positions: short factors and
    # the attention scaling of factor 128 / 64), partial rotary, a window
    "phi3_longrope": ("phi3", dict(pad_token_id=0, original_max_position_embeddings=64, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, short_factor=[1.0 + i / 8 for i in range(8)],
        long_factor=[2.0 + i for i in range(8)]))),
    "phi3_partial_rotary_window": ("phi3", dict(pad_token_id=0, sliding_window=5, rope_parameters=dict(
        rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))),
    # OPT: learned positions, ReLU, pre- and post-LN, a narrower word embedding projected in and out
    "opt_pre_ln": ("opt", dict(ffn_dim=96, pad_token_id=1)),
    "opt_post_ln_projected": ("opt", dict(ffn_dim=96, pad_token_id=1, do_layer_norm_before=False,
                                          word_embed_proj_dim=32)),
    # routed experts: top-k 2 and 1, renormalised or not, dense layers between sparse ones
    "mixtral_top2": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "mixtral_top1_window_tied": ("mixtral", dict(num_local_experts=3, num_experts_per_tok=1, sliding_window=5,
                                                 tie_word_embeddings=True)),
    "qwen3_moe_top2_norm": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                              norm_topk_prob=True)),
    "qwen3_moe_sparse_step_dense_layers": ("qwen3_moe", dict(num_hidden_layers=3, num_experts=5,
                                                             num_experts_per_tok=3, moe_intermediate_size=32,
                                                             norm_topk_prob=False, decoder_sparse_step=2,
                                                             mlp_only_layers=[0])),
    # Gemma (more in tests/test_models_gemma.py): windows shorter than the prompt (11 tokens), caps that bite,
    # query_pre_attn_scalar != head_dim
    "gemma2_window_softcaps": ("gemma2", dict(head_dim=16, sliding_window=4, attn_logit_softcapping=2.0,
                                              final_logit_softcapping=3.0, query_pre_attn_scalar=24)),
    "gemma2_mha_no_caps_untied": ("gemma2", dict(num_key_value_heads=4, head_dim=16, sliding_window=6,
                                                 attn_logit_softcapping=None, final_logit_softcapping=None,
                                                 query_pre_attn_scalar=16, tie_word_embeddings=False)),
    # window, global, window (the default alternation); one KV head; a cap of 1 on the scores
    "gemma2_mqa_three_layers": ("gemma2", dict(num_hidden_layers=3, num_key_value_heads=1, head_dim=32,
                                               sliding_window=3, attn_logit_softcapping=1.0,
                                               final_logit_softcapping=8.0, query_pre_attn_scalar=12)),
    # window, window, global; local and (linearly scaled) global RoPE differ
    "gemma3_pattern_local_rope": ("gemma3_text", dict(num_hidden_layers=3, head_dim=16, sliding_window=5,
                                                      sliding_window_pattern=3, query_pre_attn_scalar=20,
                                                      rope_parameters=GEMMA3_ROPE)),
    "gemma3_final_cap_gqa": ("gemma3_text", dict(num_hidden_layers=2, head_dim=32, sliding_window=3,
                                                 final_logit_softcapping=5.0, query_pre_attn_scalar=32)),
    # a config.json as the hub has them (transformers 4 style: rope_theta, rope_local_base_freq, rope_scaling, the
    # int sliding_window_pattern), which transformers converts into per-layer-type rope_parameters
    "gemma3_hub_style_config": ("gemma3_text", dict(num_hidden_layers=4, head_dim=16, sliding_window=4,
                                                    sliding_window_pattern=2, query_pre_attn_scalar=24,
                                                    rope_theta=1000000.0, rope_local_base_freq=10000.0,
                                                    rope_scaling={"rope_type": "linear", "factor": 8.0})),
    # explicit layer_types (the transformers 5 form), global first; an attn_logit_softcapping that transformers'
    # Gemma 3 ignores (so must we)
    "gemma3_layer_types_attn_cap": ("gemma3_text", dict(num_hidden_layers=3, num_key_value_heads=1, head_dim=16,
                                                        sliding_window=4, attn_logit_softcapping=1.5,
                                                        query_pre_attn_scalar=8, rope_parameters=GEMMA3_ROPE,
                                                        layer_types=["full_attention", "sliding_attention",
                                                                     "sliding_attention"])),
}


def config_of(case: str, **extra: object) -> PretrainedConfig:
    model_type, overrides = CASES[case]
    return AutoConfig.for_model(model_type, **{**BASE, **overrides, **extra})


@pytest.mark.parametrize("case", list(CASES))
def test_paged_logits_match_transformers(case: str) -> None:
    check_paged_logits(*build_pair(config_of(case)))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_engine_greedy_and_seeded_sampling_match(case: str, tmp_path) -> None:
    hf = build_hf(config_of(case, **ENGINE_VOCAB))
    check_engine_greedy_and_seeded(hf, save_model_dir(hf, tmp_path))


def test_phi3_longrope_uses_long_factors_past_the_original_context() -> None:
    """A prefill inside original_max_position_embeddings (8), then decode steps past it, against transformers'
    cached forward step by step (its factors follow the step's last position, as ours follow each position).
    The engine checks above stay inside the original context: transformers' `generate` re-encodes the whole
    sequence with long factors once it outgrows it, which a KV cache cannot do."""
    hf, ours = build_pair(config_of("phi3_longrope", original_max_position_embeddings=8))
    tokens = torch.randint(0, hf.config.vocab_size, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    harness, seq, hf_cache = PagedHarness(ours), PagedSeq(), DynamicCache(config=hf.config)
    for start, end in [(0, 6), *((p, p + 1) for p in range(6, len(tokens)))]:
        got = harness.step([(seq, tokens[start:end])])[0]
        with torch.no_grad():
            expected = hf(torch.tensor([tokens[start:end]]), cache=hf_cache,
                          position_ids=torch.arange(start, end)[None]).logits[0]
        torch.testing.assert_close(got, expected, atol=PARITY_ATOL, rtol=0, msg=lambda m: f"step {start}: {m}")


def test_opt_loads_the_hub_checkpoints_unprefixed_names() -> None:
    """facebook/opt-* on the hub name tensors `decoder.*` (no `model.`)."""
    from lmport.engine.models import get_model_class

    hf = build_hf(config_of("opt_pre_ln"))
    ours = get_model_class(hf.config)(hf.config)
    ours.load_weights((name.removeprefix("model."), tensor) for name, tensor in hf.state_dict().items())
    check_paged_logits(hf, ours)
