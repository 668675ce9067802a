"""Qwen3 (dense): Llama with a per-head RMSNorm on q and k before RoPE, and an explicit head_dim."""

from __future__ import annotations

from lmport.engine.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class Qwen3DecoderLayer(LlamaDecoderLayer):
    qk_norm = "head"


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3DecoderLayer
