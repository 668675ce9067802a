"""Architecture registry, context limits and weight-loading checks of the native models."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from lmport.engine.errors import UnsupportedModel
from lmport.engine.models import LlamaForCausalLM, get_model_class
from lmport.engine.models.layers import PagedAttention
from tests.model_harness import tiny_llama

TINY = dict(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


@pytest.mark.parametrize("config", [LlamaConfig(**TINY), MistralConfig(**TINY), Qwen2Config(**TINY)])
def test_supported_architectures_map_to_the_llama_family(config) -> None:
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    assert get_model_class(config) is LlamaForCausalLM


def test_unsupported_architecture_lists_the_supported_ones() -> None:
    config = GPT2Config(architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM, "
                                               "Qwen2ForCausalLM"):
        get_model_class(config)


def test_config_without_architectures_falls_back_to_model_type() -> None:
    assert get_model_class(LlamaConfig(**TINY)) is LlamaForCausalLM
    with pytest.raises(UnsupportedModel, match="none in config.json"):
        get_model_class(GPT2Config())


def test_unsupported_rope_type_is_named() -> None:
    config = LlamaConfig(**TINY, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(UnsupportedModel, match="'dynamic'.*default, linear, llama3, yarn"):
        LlamaForCausalLM(config)


def test_context_limit_follows_rope_scaling() -> None:
    assert LlamaForCausalLM.max_context_len(LlamaConfig(**TINY)) == 256
    linear = LlamaConfig(**TINY, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4})
    assert LlamaForCausalLM.max_context_len(linear) == 1024
    # a window no longer caps the context: windowed layers attend over the last sliding_window keys
    assert LlamaForCausalLM.max_context_len(MistralConfig(**TINY, sliding_window=64)) == 256


def test_each_layer_gets_its_own_window() -> None:
    def windows(config) -> list[int | None]:
        return [m.sliding_window for m in LlamaForCausalLM(config).modules() if isinstance(m, PagedAttention)]

    three = {**TINY, "num_hidden_layers": 3}
    assert windows(MistralConfig(**three, sliding_window=64)) == [64, 64, 64]
    assert windows(MistralConfig(**three, sliding_window=None)) == [None, None, None]
    assert windows(Qwen2Config(**three, sliding_window=64)) == [None, None, None]  # not enabled
    assert windows(Qwen2Config(**three, sliding_window=64, use_sliding_window=True,
                               max_window_layers=1)) == [None, 64, 64]


def test_rope_cache_is_sized_by_max_model_len_and_shared() -> None:
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": 2}), max_model_len=40)
    rotary = model.model.layers[0].self_attn.rotary_emb
    assert rotary is model.model.layers[1].self_attn.rotary_emb
    assert rotary.cos_sin_cache.shape == (40, 8) and rotary.cos_sin_cache.dtype == torch.float32
    assert len([m for m in model.modules() if isinstance(m, PagedAttention)]) == 2


def test_load_weights_rejects_missing_unknown_and_misshapen_tensors() -> None:
    hf = tiny_llama()
    state = dict(hf.state_dict())
    model = LlamaForCausalLM(hf.config)
    with pytest.raises(UnsupportedModel, match=r"lacks 1 tensor\(s\): model.layers.1.self_attn.qkv_proj.weight\[2\]"):
        model.load_weights((k, v) for k, v in state.items() if k != "model.layers.1.self_attn.v_proj.weight")
    with pytest.raises(UnsupportedModel, match="'model.extra.weight' has no place"):
        model.load_weights([*state.items(), ("model.extra.weight", torch.zeros(1))])
    state["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(UnsupportedModel, match=r"'model.norm.weight' has shape \(3,\), expected \(64,\)"):
        model.load_weights(state.items())


def test_an_unsupported_activation_is_named() -> None:
    with pytest.raises(UnsupportedModel, match="hidden activation 'gelu' is not supported; supported: silu, "
                                               "gelu_pytorch_tanh"):
        LlamaForCausalLM(LlamaConfig(**TINY, hidden_act="gelu"))

