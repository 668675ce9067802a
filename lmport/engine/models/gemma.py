"""Gemma 2 and Gemma 3 (text) on the Llama blocks.

What differs from Llama: RMSNorm weights are stored as w - 1 (one is added at load, so the shared norm kernel
runs unchanged), the embedding is scaled by sqrt(hidden_size), the MLP is GeLU-tanh gated, attention and MLP
outputs are normed before they join the residual (four norms a layer), the softmax scale comes from
query_pre_attn_scalar, layers alternate sliding-window and global attention (`layer_types`), and the logits may
be soft-capped. Gemma 2 also soft-caps the attention scores; Gemma 3 instead norms q and k per head and gives its
local layers their own RoPE base.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from lmport.engine.models.layers import Embedding, RMSNorm, RotaryEmbedding
from lmport.engine.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, _head_dim
from lmport.engine.models.rope import cos_sin_cache


class GemmaDecoderLayer(nn.Module):
    def __init__(self, hf_config: PretrainedConfig, rotary: RotaryEmbedding, layer_idx: int) -> None:
        super().__init__()
        qk_norm = "head" if hf_config.model_type == "gemma3_text" else None
        self.self_attn = LlamaAttention(hf_config, rotary, layer_idx, qk_norm,
                                        scale=hf_config.query_pre_attn_scalar ** -0.5,
                                        soft_cap=getattr(hf_config, "attn_logit_softcapping", None))
        self.mlp = LlamaMLP(hf_config)
        hidden, eps = hf_config.hidden_size, hf_config.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # As in the Llama layer, the residual add is fused into the next norm: the branch outputs are normed first.
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaModel(nn.Module):
    def __init__(self, hf_config: PretrainedConfig, max_positions: int) -> None:
        super().__init__()
        head_dim = _head_dim(hf_config)
        self.embed_tokens = Embedding(hf_config.vocab_size, hf_config.hidden_size)
        self.embed_scale = hf_config.hidden_size ** 0.5  # rounded to the model dtype, as transformers does
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
        hidden = self.embed_tokens(input_ids)
        hidden, residual = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Gemma2ForCausalLM(LlamaForCausalLM):
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
    """Same blocks; the differences (q/k norm, per-layer-type RoPE, no attention soft-cap) come from the config."""
