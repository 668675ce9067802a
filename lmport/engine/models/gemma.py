"""Gemma 2 and Gemma 3 (text) on the Llama blocks.

What differs from Llama: RMSNorm weights are stored as w - 1 (one is added at load, so the shared norm kernel
runs unchanged), the embedding is scaled by sqrt(hidden_size), the MLP is GeLU-tanh gated, attention and MLP
outputs are normed before they join the residual (four norms a layer), the softmax scale comes from
query_pre_attn_scalar, layers alternate sliding-window and global attention (`layer_types`), and the logits may
be soft-capped. Gemma 2 also soft-caps the attention scores; Gemma 3 instead norms q and k per head and gives its
local layers their own RoPE base. A Gemma 3 vision-language checkpoint serves text through its language model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from transformers import PretrainedConfig

from lmport.engine.errors import UnsupportedModel
from lmport.engine.models.layers import Embedding, RMSNorm, RotaryEmbedding
from lmport.engine.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, _head_dim
from lmport.engine.models.rope import cos_sin_cache


class GemmaDecoderLayer(nn.Module):
    def __init__(self, hf_config: PretrainedConfig, rotary: RotaryEmbedding, layer_idx: int) -> None:
        super().__init__()
        gemma3 = hf_config.model_type == "gemma3_text"
        # Gemma 3 configs carry attn_logit_softcapping too, but transformers (and vLLM) never apply it there
        soft_cap = None if gemma3 else hf_config.attn_logit_softcapping
        self.self_attn = LlamaAttention(hf_config, rotary, layer_idx, "head" if gemma3 else None,
                                        scale=hf_config.query_pre_attn_scalar ** -0.5, soft_cap=soft_cap)
        self.mlp = LlamaMLP(hf_config)
        hidden, eps = hf_config.hidden_size, hf_config.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # As in the Llama layer, the residual add is fused into the next norm: the branch outputs are normed first.
        hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaModel(nn.Module):
    def __init__(self, hf_config: PretrainedConfig, max_positions: int) -> None:
        super().__init__()
        head_dim = _head_dim(hf_config)
        self.embed_tokens = Embedding(hf_config.vocab_size, hf_config.hidden_size)
        # transformers multiplies by sqrt(hidden_size) rounded to the model dtype: round it once here
        self.embed_scale = torch.tensor(hf_config.hidden_size ** 0.5, dtype=self.embed_tokens.weight.dtype).item()
        layer_types = hf_config.layer_types
        # one RoPE cache per layer type where each has its own settings (Gemma 3), else one for all (Gemma 2)
        per_type = isinstance((getattr(hf_config, "rope_parameters", None) or {}).get("full_attention"), dict)
        kinds = list(dict.fromkeys(layer_types)) if per_type else [None]
        rotary = {kind: RotaryEmbedding(cos_sin_cache(hf_config, head_dim, max_positions, kind), head_dim)
                  for kind in kinds}
        self.layers = nn.ModuleList(GemmaDecoderLayer(hf_config, rotary[kind if per_type else None], i)
                                    for i, kind in enumerate(layer_types))
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids) * self.embed_scale, None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Gemma2ForCausalLM(LlamaForCausalLM):
    def __init__(self, hf_config: PretrainedConfig, max_model_len: int | None = None) -> None:
        if getattr(hf_config, "use_bidirectional_attention", False):
            raise UnsupportedModel("use_bidirectional_attention=True (an EmbeddingGemma-style encoder) is not "
                                   f"supported by {type(self).__name__}: lmport runs Gemma as a causal decoder")
        super().__init__(hf_config, max_model_len)

    def make_model(self, hf_config: PretrainedConfig, max_positions: int) -> nn.Module:
        return GemmaModel(hf_config, max_positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Norm weights are stored as w - 1: the model multiplies by (1 + w)."""
        super().load_weights((name, tensor + 1 if name.endswith("norm.weight") else tensor)
                             for name, tensor in weights)


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Same blocks; the differences (q/k norm, per-layer-type RoPE, no attention soft-cap) follow the config's
    model_type and rope_parameters."""

    @staticmethod
    def max_context_len(hf_config: PretrainedConfig) -> int:
        # Gemma 3's max_position_embeddings is already the stretched context (128K with linear factor 8 on a 16K
        # original); vLLM's max-length rule exempts Gemma 3 from multiplying by the factor for the same reason.
        return hf_config.max_position_embeddings


# tensors of a vision-language checkpoint that text generation never reads, in hub and transformers-5 naming
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _language_model_tensors(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Gemma3ForConditionalGeneration names -> Gemma3ForCausalLM names: `language_model.model.*` (hub checkpoints,
    also what transformers 5 saves) or `model.language_model.*` (transformers 5 in memory) -> `model.*`."""
    for name, tensor in weights:
        if name.startswith(_VISION_PREFIXES):
            continue
        if name.startswith("model.language_model."):
            name = "model." + name.removeprefix("model.language_model.")
        yield name.removeprefix("language_model."), tensor


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """The language model of a Gemma 3 vision-language checkpoint (gemma-3-4b/12b/27b), for text prompts only:
    built from the config's text_config (the loader passes `get_text_config()`); the vision tower and projector
    are not loaded, so images cannot be sent."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(_language_model_tensors(weights))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # transformers' Gemma3ForConditionalGeneration never applies final_logit_softcapping (Google's checkpoints
        # set none): match it rather than Gemma3ForCausalLM
        return LlamaForCausalLM.compute_logits(self, hidden)
