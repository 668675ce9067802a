"""IBM Granite (3.x): Llama with four multipliers. The embedding and residual multipliers are read by the Llama
blocks themselves (default 1); this file adds the attention scale and the logits divisor."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from lmport.engine.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class GraniteDecoderLayer(LlamaDecoderLayer):
    @staticmethod
    def attention_scale(hf_config: PretrainedConfig) -> float | None:
        return hf_config.attention_multiplier  # replaces head_dim ** -0.5


class GraniteForCausalLM(LlamaForCausalLM):
    layer_cls = GraniteDecoderLayer

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) / self.config.logits_scaling
