"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) on the paged KV cache.

Input is one flattened varlen batch: token ids and positions [T]; attention metadata comes from the forward context.
q/k/v and gate/up are fused projections; load_weights maps HF checkpoint names onto them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from lmport.engine.models.layers import (Embedding, Linear, PagedAttention, RMSNorm, RotaryEmbedding,
                                         gated_activation, layer_sliding_window)
from lmport.engine.models.rope import cos_sin_cache, rope_context_len
from lmport.engine.models.weights import load_checkpoint

# checkpoint projection name -> (fused parameter module, shard index)
FUSED_PROJECTIONS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def checkpoint_parts(module_name: str) -> list[str]:
    """HF checkpoint names (without `.weight`) of the projections a Linear fuses, in row order."""
    prefix, _, leaf = module_name.rpartition(".")
    parts = sorted((shard, proj) for proj, (fused, shard) in FUSED_PROJECTIONS.items() if fused == leaf)
    return [f"{prefix}.{proj}" for _, proj in parts] or [module_name]


def _head_dim(hf_config: PretrainedConfig) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


class LlamaAttention(nn.Module):
    """q|k|v projection, optional q/k RMSNorm, RoPE, paged attention, o projection.

    qk_norm: None; "head" = one RMSNorm over head_dim shared by every head (Qwen3, Gemma 3); "projection" = one
    RMSNorm over the whole q (and k) projection (OLMo 2). scale defaults to head_dim ** -0.5.
    """

    def __init__(self, hf_config: PretrainedConfig, rotary: RotaryEmbedding, layer_idx: int,
                 qk_norm: str | None = None, scale: float | None = None, soft_cap: float | None = None) -> None:
        super().__init__()
        hidden, head_dim = hf_config.hidden_size, _head_dim(hf_config)
        num_heads, num_kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
        self.head_dim = head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        # Qwen2 always has q/k/v bias (and none on o_proj); Llama's attention_bias covers all four.
        qkv_bias = hf_config.model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False))
        o_bias = hf_config.model_type != "qwen2" and bool(getattr(hf_config, "attention_bias", False))
        self.qkv_proj = Linear(hidden, [self.q_size, self.kv_size, self.kv_size], bias=qkv_bias)
        self.o_proj = Linear(self.q_size, [hidden], bias=o_bias)
        self.qk_norm = qk_norm
        if qk_norm is not None:
            q_dim, k_dim = (head_dim, head_dim) if qk_norm == "head" else (self.q_size, self.kv_size)
            self.q_norm = RMSNorm(q_dim, hf_config.rms_norm_eps)
            self.k_norm = RMSNorm(k_dim, hf_config.rms_norm_eps)
        self.rotary_emb = rotary
        self.attn = PagedAttention(num_heads, num_kv_heads, head_dim, scale=scale or head_dim ** -0.5,
                                   sliding_window=layer_sliding_window(hf_config, layer_idx), soft_cap=soft_cap)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm == "head":
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        elif self.qk_norm == "projection":
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), gate|up fused. The activation follows the config's hidden_act /
    hidden_activation (SiLU for Llama; GeLU-tanh for Gemma)."""

    def __init__(self, hf_config: PretrainedConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        hidden, inter = hf_config.hidden_size, intermediate_size or hf_config.intermediate_size
        bias = bool(getattr(hf_config, "mlp_bias", False))
        self.gate_up_proj = Linear(hidden, [inter, inter], bias=bias)
        self.down_proj = Linear(inter, [hidden], bias=bias)
        self.act_and_mul = gated_activation(getattr(hf_config, "hidden_activation", None)
                                            or getattr(hf_config, "hidden_act", "silu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block. A family changes its parts through the class attributes (see Qwen3, Mixtral, Granite)."""

    qk_norm: str | None = None

    def __init__(self, hf_config: PretrainedConfig, rotary: RotaryEmbedding, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(hf_config, rotary, layer_idx, self.qk_norm, self.attention_scale(hf_config))
        self.mlp = self.make_mlp(hf_config, layer_idx)
        self.input_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.residual_multiplier = float(getattr(hf_config, "residual_multiplier", 1.0))  # Granite

    @staticmethod
    def attention_scale(hf_config: PretrainedConfig) -> float | None:
        return None

    def make_mlp(self, hf_config: PretrainedConfig, layer_idx: int) -> nn.Module:
        return LlamaMLP(hf_config)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual stream is carried separately so each norm fuses the preceding residual add (a scaled branch,
        # Granite's, is scaled before that add).
        hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        if self.residual_multiplier != 1.0:
            hidden = hidden * self.residual_multiplier
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        hidden = self.mlp(hidden)
        if self.residual_multiplier != 1.0:
            hidden = hidden * self.residual_multiplier
        return hidden, residual


class LlamaModel(nn.Module):
    def __init__(self, hf_config: PretrainedConfig, max_positions: int,
                 layer_cls: type[nn.Module] = LlamaDecoderLayer) -> None:
        super().__init__()
        head_dim = _head_dim(hf_config)
        self.embed_tokens = Embedding(hf_config.vocab_size, hf_config.hidden_size)
        self.embedding_multiplier = float(getattr(hf_config, "embedding_multiplier", 1.0))  # Granite
        rotary = RotaryEmbedding(cos_sin_cache(hf_config, head_dim, max_positions), head_dim)
        self.layers = nn.ModuleList(layer_cls(hf_config, rotary, i) for i in range(hf_config.num_hidden_layers))
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        if self.embedding_multiplier != 1.0:
            hidden = hidden * self.embedding_multiplier
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Llama and the families that differ from it only in their decoder layer (`layer_cls`)."""

    layer_cls: type[nn.Module] = LlamaDecoderLayer

    def __init__(self, hf_config: PretrainedConfig, max_model_len: int | None = None) -> None:
        """max_model_len sizes the RoPE cache (default: the model's own limit, see max_context_len)."""
        super().__init__()
        self.config = hf_config
        self.model = self.make_model(hf_config, max_model_len or self.max_context_len(hf_config))
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = Linear(hf_config.hidden_size, [hf_config.vocab_size])
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_model(self, hf_config: PretrainedConfig, max_positions: int) -> nn.Module:
        return LlamaModel(hf_config, max_positions, self.layer_cls)

    @staticmethod
    def max_context_len(hf_config: PretrainedConfig) -> int:
        """Longest sequence the model supports (its RoPE settings' context; windowed layers attend past it)."""
        return rope_context_len(hf_config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype: the sampler upcasts only when it needs more than an argmax."""
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named checkpoint tensors into the (fused) parameters; see models.weights.load_checkpoint."""
        def place(name: str) -> tuple[str, int | None] | None:
            if "rotary_emb.inv_freq" in name or (self.tie_word_embeddings and name == "lm_head.weight"):
                return None  # recomputed here / shared with the embedding
            *prefix, proj, kind = name.split(".")
            proj, shard = FUSED_PROJECTIONS.get(proj, (proj, None))
            return ".".join([*prefix, proj, kind]), shard

        load_checkpoint(self, weights, place)
