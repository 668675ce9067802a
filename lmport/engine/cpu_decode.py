"""Decode steps on CPU run by the C++ decode stack (lmport.kernels.cpu_decoder) instead of module by module.

Why: a decode step of a small model is mostly Python around microsecond ops (see lmport.kernels.cpu_decoder); the
stack issues the same ops from C++ in one call. It is the CPU counterpart of lmport.engine.cuda_graphs and, like the
graphs, is skipped with `enforce_eager=True`.

Which models: the Llama-family decoder as lmport.engine.models.llama defines it (Llama, SmolLM2, Mistral, Qwen2,
Qwen3's per-head q/k norms), with SiLU MLPs and full-width RoPE, on a cache in the model dtype, in one process, without
LoRA. Every other model, and every step with prefill rows, runs the modules. `unsupported_reason` says why a model
does not qualify.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch
from torch import nn

from lmport import kernels
from lmport.engine.forward_context import AttentionMetadata
from lmport.engine.models.layers import Linear
from lmport.engine.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP, LlamaModel
from lmport.engine.quantization import Int4Weight, Int8Weight
from lmport.kernels import cpu as cpu_kernels

logger = logging.getLogger("lmport")


def unsupported_reason(model: nn.Module, cache_dtype: torch.dtype) -> str | None:
    """Why `model`'s decode steps cannot run on the C++ stack, or None when they can."""
    inner = getattr(model, "model", None)
    if not isinstance(inner, LlamaModel) or type(inner).forward is not LlamaModel.forward:
        return f"{type(model).__name__} is not a Llama-family decoder"
    if inner.embedding_multiplier != 1.0:
        return "the embedding is scaled"
    weight = inner.embed_tokens.weight
    if weight.device.type != "cpu":
        return f"the model is on {weight.device}"
    if cache_dtype != weight.dtype:
        return f"the KV cache holds {cache_dtype}, not the model's {weight.dtype}"
    for layer in inner.layers:
        if type(layer).forward is not LlamaDecoderLayer.forward or layer.residual_multiplier != 1.0:
            return f"{type(layer).__name__} changes the Llama layer"
        attention, mlp = layer.self_attn, layer.mlp
        if type(attention) is not LlamaAttention or attention.qk_norm not in (None, "head"):
            return f"{type(layer).__name__}'s attention is not Llama's"
        if attention.rotary_emb.rotary_dim != attention.head_dim:
            return "RoPE rotates part of each head"
        if attention.rotary_emb.cos_sin_cache.dtype != torch.float32:
            return "the RoPE cache is not float32"
        if attention.attn.k_scale != 1.0 or attention.attn.v_scale != 1.0:
            return "the KV cache is scaled"
        if type(mlp) is not LlamaMLP or mlp.act_and_mul is not kernels.silu_and_mul:
            return f"{type(layer).__name__}'s MLP is not a SiLU-gated one"
        if any(linear.lora is not None for linear in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj,
                                                       mlp.down_proj)):
            return "a LoRA adapter targets the layer"
    return None


class CpuDecodeStack:
    """The model's decoder layers as one C++ object; `run` takes a decode-only step's tensors (as DecodeGraphs.run)."""

    def __init__(self, model: nn.Module) -> None:
        module = cpu_kernels.load()
        if module is None:
            raise RuntimeError("the CPU C++ kernels are not available")
        inner: LlamaModel = model.model
        first = inner.layers[0].self_attn
        self.stack = module.DecoderStack(
            embedding=inner.embed_tokens.weight, final_norm=inner.norm.weight, final_eps=inner.norm.eps,
            cos_sin_cache=first.rotary_emb.cos_sin_cache, num_heads=first.attn.num_heads,
            num_kv_heads=first.attn.num_kv_heads, head_dim=first.head_dim,
            layers=[self._layer(module, layer) for layer in inner.layers])

    @staticmethod
    def _layer(module: ModuleType, layer: LlamaDecoderLayer) -> object:
        attention, mlp = layer.self_attn, layer.mlp
        head_norm = attention.qk_norm == "head"
        attn = attention.attn
        return module.DecoderLayer(
            input_norm=layer.input_layernorm.weight, input_eps=layer.input_layernorm.eps,
            post_norm=layer.post_attention_layernorm.weight, post_eps=layer.post_attention_layernorm.eps,
            q_norm=attention.q_norm.weight if head_norm else None,
            k_norm=attention.k_norm.weight if head_norm else None,
            qk_eps=attention.q_norm.eps if head_norm else 0.0,
            qkv=_fused_linear(module, attention.qkv_proj), o=_fused_linear(module, attention.o_proj),
            gate_up=_fused_linear(module, mlp.gate_up_proj), down=_fused_linear(module, mlp.down_proj),
            k_cache=attn.k_cache, v_cache=attn.v_cache, scale=attn.scale, window=attn.sliding_window or 0,
            soft_cap=attn.soft_cap or 0.0)

    @classmethod
    def build(cls, model: nn.Module, cache_dtype: torch.dtype) -> CpuDecodeStack | None:
        """The stack for `model`, or None (logged) where it does not qualify or the C++ kernels are unavailable."""
        reason = unsupported_reason(model, cache_dtype)
        if reason is None and kernels.get_backend() != "auto":
            reason = f"kernel_backend is {kernels.get_backend()!r}"
        if reason is None and not cpu_kernels.available():
            reason = "the CPU C++ kernels could not be built"
        if reason is not None:
            logger.info("CPU decode stack off (%s): decode steps run module by module", reason)
            return None
        return cls(model)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Final-normed hidden states [T, H] of a decode-only step, bit-identical to the model's forward."""
        return self.stack.forward(input_ids, positions, meta.slot_mapping, meta.decode_block_tables,
                                  meta.decode_seq_lens)


def _fused_linear(module: ModuleType, linear: Linear) -> object:
    """The C++ stack's view of a Linear: the same matmul op its forward calls."""
    form = linear.quantized
    if isinstance(form, Int8Weight):
        return module.FusedLinear("w8a8" if form.blocked else "int8", form.weight, form.scales, None, 0, linear.bias)
    if isinstance(form, Int4Weight) and form.offsets is not None:
        return module.FusedLinear("w4a8", form.packed, form.scales, form.offsets, form.group_size, linear.bias)
    if isinstance(form, Int4Weight):
        return module.FusedLinear("int4", form.packed, form.scales, None, form.group_size, linear.bias)
    if linear.packed is not None:
        return module.FusedLinear("packed", linear.packed, None, None, 0, linear.bias)
    return module.FusedLinear("plain", linear.weight, None, None, 0, linear.bias)
