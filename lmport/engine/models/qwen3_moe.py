"""Qwen3-MoE: Qwen3 attention (per-head q/k norm) with routed experts on the layers the config selects
(`decoder_sparse_step`, `mlp_only_layers`) and a dense MLP on the others."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from lmport.engine.models.llama import LlamaForCausalLM, LlamaMLP
from lmport.engine.models.moe import SparseMoE, stack_expert_weights
from lmport.engine.models.qwen3 import Qwen3DecoderLayer


def is_sparse_layer(hf_config: PretrainedConfig, layer_idx: int) -> bool:
    return (layer_idx not in (hf_config.mlp_only_layers or []) and hf_config.num_experts > 0
            and (layer_idx + 1) % hf_config.decoder_sparse_step == 0)


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    def make_mlp(self, hf_config: PretrainedConfig, layer_idx: int) -> nn.Module:
        if not is_sparse_layer(hf_config, layer_idx):
            return LlamaMLP(hf_config)
        return SparseMoE(hf_config.hidden_size, hf_config.moe_intermediate_size, hf_config.num_experts,
                         hf_config.num_experts_per_tok, renormalize=bool(hf_config.norm_topk_prob))


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3MoeDecoderLayer

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(stack_expert_weights(weights, self.config.num_experts))
