"""Mixtral: Mistral attention (sliding window where configured) with routed experts in place of the MLP."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from lmport.engine.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from lmport.engine.models.moe import SparseMoE, stack_expert_weights


class MixtralDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, hf_config: PretrainedConfig, layer_idx: int) -> nn.Module:
        return SparseMoE(hf_config.hidden_size, hf_config.intermediate_size, hf_config.num_local_experts,
                         hf_config.num_experts_per_tok, renormalize=True)


class MixtralForCausalLM(LlamaForCausalLM):
    layer_cls = MixtralDecoderLayer

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(stack_expert_weights(weights, self.config.num_local_experts))
