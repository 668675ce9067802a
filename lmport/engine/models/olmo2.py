"""OLMo 2: RMSNorm over the whole q and k projections, and norms on the outputs of attention and the MLP
(added to the residual afterwards) instead of on their inputs."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from lmport.engine.models.layers import RMSNorm, RotaryEmbedding
from lmport.engine.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class Olmo2DecoderLayer(LlamaDecoderLayer):
    qk_norm = "projection"

    def __init__(self, hf_config: PretrainedConfig, rotary: RotaryEmbedding, layer_idx: int) -> None:
        super().__init__(hf_config, rotary, layer_idx)
        del self.input_layernorm  # no pre-norm
        self.post_feedforward_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # Same contract as the Llama layer: the block's input is hidden + residual; the output pair sums likewise.
        if residual is not None:
            hidden = hidden + residual
        hidden = hidden + self.post_attention_layernorm(self.self_attn(positions, hidden))
        return self.post_feedforward_layernorm(self.mlp(hidden)), hidden


class Olmo2ForCausalLM(LlamaForCausalLM):
    layer_cls = Olmo2DecoderLayer
