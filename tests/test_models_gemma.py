"""Gemma 2 and Gemma 3 beyond the family parity checks: the Gemma configs of tests/test_models_families.py (run
its tests with `-k gemma`: paged logits within 1e-4 of transformers, engine greedy and seeded sampling) reach the
right layers here, Gemma 3's context limit and refusals, and the text part of a Gemma 3 vision-language checkpoint
through the same checks against transformers' Gemma3ForConditionalGeneration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

from lmport.engine.config import EngineConfig
from lmport.engine.errors import UnsupportedModel
from lmport.engine.loader import load_model
from lmport.engine.models import MODEL_REGISTRY, get_model_class
from tests.model_family_checks import (build_pair, check_engine_greedy_and_seeded, check_paged_logits,
                                       randomise_norms_and_biases)
from tests.model_harness import save_tokenizer
from tests.test_models_families import BASE, ENGINE_VOCAB, config_of


def attention_of(case: str) -> list:
    _, ours = build_pair(config_of(case))
    return [layer.self_attn for layer in ours.model.layers]


def test_each_layer_gets_its_window_cap_scale_and_rope() -> None:
    gemma2 = attention_of("gemma2_mqa_three_layers")
    assert [a.attn.sliding_window for a in gemma2] == [3, None, 3]
    assert {a.attn.soft_cap for a in gemma2} == {1.0} and {a.attn.scale for a in gemma2} == {12 ** -0.5}
    gemma3 = attention_of("gemma3_layer_types_attn_cap")  # its attn_logit_softcapping is not applied
    assert [a.attn.sliding_window for a in gemma3] == [None, 4, 4]
    assert {a.attn.soft_cap for a in gemma3} == {None} and {a.attn.scale for a in gemma3} == {8 ** -0.5}
    global_, local, _ = (a.rotary_emb for a in gemma3)
    assert local is gemma3[2].rotary_emb and not torch.equal(local.cos_sin_cache, global_.cos_sin_cache)


def test_gemma3_context_is_max_position_embeddings_not_stretched_again() -> None:
    config = config_of("gemma3_hub_style_config")  # linear factor 8 on the global layers
    assert get_model_class(config).max_context_len(config) == BASE["max_position_embeddings"]


def test_bidirectional_gemma_is_refused_by_name() -> None:
    config = config_of("gemma3_final_cap_gqa", use_bidirectional_attention=True)  # EmbeddingGemma
    with pytest.raises(UnsupportedModel, match="use_bidirectional_attention=True"):
        get_model_class(config)(config)


# --- the text part of a Gemma 3 vision-language checkpoint ---

class TextOnlyView(torch.nn.Module):
    """transformers' Gemma3ForConditionalGeneration seen as a causal LM over text (no pixel_values): the interface
    the family checks call (`config.vocab_size`, forward(ids).logits, generate)."""

    def __init__(self, multimodal: Gemma3ForConditionalGeneration) -> None:
        super().__init__()
        self.multimodal, self.config = multimodal, multimodal.config.text_config

    def forward(self, input_ids: torch.Tensor):
        return self.multimodal(input_ids=input_ids)

    def generate(self, *args, **kwargs) -> torch.Tensor:
        return self.multimodal.generate(*args, **kwargs)


VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)  # a one-layer SigLIP tower: present in the checkpoint, never run for text


def tiny_multimodal(case: str, **text_extra: object) -> TextOnlyView:
    """A random Gemma3ForConditionalGeneration whose language model is the Gemma 3 `case`."""
    torch.manual_seed(0)
    config = Gemma3Config(text_config=config_of(case, **text_extra), vision_config=VISION, mm_tokens_per_image=4,
                          dtype=torch.float32)
    hf = Gemma3ForConditionalGeneration(config).eval()
    randomise_norms_and_biases(hf)
    return TextOnlyView(hf)


def save_multimodal(hf: TextOnlyView, path: Path) -> Path:
    """Saved as the hub stores them: `language_model.model.*`, `vision_tower.*`, `multi_modal_projector.*`."""
    hf.multimodal.save_pretrained(path)
    save_tokenizer(path)
    return path


def test_multimodal_checkpoint_serves_text_through_its_language_model(tmp_path: Path) -> None:
    hf = tiny_multimodal("gemma3_pattern_local_rope", **ENGINE_VOCAB)
    loaded = load_model(EngineConfig(model=str(save_multimodal(hf, tmp_path)), dtype="float32", device="cpu"))
    assert type(loaded.model).__name__ == "Gemma3ForConditionalGeneration"
    assert loaded.vocab_size == 260 and loaded.eos_token_ids[0] == 259
    check_paged_logits(hf, loaded.model)


def test_multimodal_in_memory_tensor_names_load_too() -> None:
    """transformers 5 names the tensors `model.language_model.*` in memory (the loader test reads the hub's). The
    case has a final_logit_softcapping, which transformers' multimodal class (unlike its causal LM) ignores."""
    hf = tiny_multimodal("gemma3_final_cap_gqa")
    state = hf.multimodal.state_dict()
    assert any(name.startswith("model.language_model.") for name in state)
    ours = MODEL_REGISTRY["Gemma3ForConditionalGeneration"](hf.config)  # in memory the config has no architectures
    ours.load_weights(state.items())
    check_paged_logits(hf, ours)


@pytest.mark.slow
def test_multimodal_checkpoint_engine_greedy_and_seeded_sampling_match(tmp_path: Path) -> None:
    hf = tiny_multimodal("gemma3_layer_types_attn_cap", **ENGINE_VOCAB)
    check_engine_greedy_and_seeded(hf, save_multimodal(hf, tmp_path))
