"""Rotary position embeddings: the scaling variants HF configs use, precomputed into one cos/sin cache.

The inverse frequencies mirror transformers' `modeling_rope_utils` op for op (in float32), so fp32 logits match HF.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import PretrainedConfig

from lmport.engine.errors import UnsupportedModel

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def rope_parameters(hf_config: PretrainedConfig, layer_type: str | None = None) -> dict[str, Any]:
    """The config's RoPE settings as one dict with `rope_type` and `rope_theta` (old and new config styles).

    Configs whose layer types use different RoPE (Gemma 3: `rope_parameters` keyed by `sliding_attention` /
    `full_attention`) give the settings of `layer_type`, by default the global layers'."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    if isinstance(params.get("full_attention"), dict):
        params = dict(params[layer_type or "full_attention"])
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] == "su":  # Phi-3's early name for LongRoPE
        params["rope_type"] = "longrope"
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    params.setdefault("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None) or 1.0)
    params.setdefault("original_max_position_embeddings",
                      getattr(hf_config, "original_max_position_embeddings", None))
    if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModel(f"rope_type {params['rope_type']!r} is not supported; supported RoPE types: "
                               f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    return params


def rotary_dim(hf_config: PretrainedConfig, head_dim: int, layer_type: str | None = None) -> int:
    """How many leading channels of each head are rotated (partial_rotary_factor: Phi-4-mini, ...)."""
    return int(head_dim * rope_parameters(hf_config, layer_type)["partial_rotary_factor"])


def rope_context_len(hf_config: PretrainedConfig) -> int:
    """Longest context the RoPE settings are meant for (vLLM's rule: linear and yarn stretch the original length)."""
    params = rope_parameters(hf_config)
    max_positions = hf_config.max_position_embeddings
    if params["rope_type"] in ("linear", "yarn"):
        original = params.get("original_max_position_embeddings") or max_positions
        return max(max_positions, int(original * params["factor"]))
    return max_positions


def inv_freq_and_scaling(hf_config: PretrainedConfig, head_dim: int,
                         layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    params = rope_parameters(hf_config, layer_type)
    base, rope_type = params["rope_theta"], params["rope_type"]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "linear":
        return inv_freq / params["factor"], 1.0
    if rope_type == "llama3":
        return _llama3(inv_freq, params), 1.0
    if rope_type == "yarn":
        return _yarn(inv_freq, params, hf_config, head_dim)
    return inv_freq, 1.0


def _llama3(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(inv_freq: torch.Tensor, params: dict[str, Any], hf_config: PretrainedConfig,
          dim: int) -> tuple[torch.Tensor, float]:
    base = params["rope_theta"]
    original = params.get("original_max_position_embeddings") or hf_config.max_position_embeddings
    factor = params.get("factor") or hf_config.max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(params.get("beta_fast") or 32), correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)  # as HF, for identical rounding
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + inv_freq * extrapolation, float(attention_factor)


def _longrope(params: dict[str, Any], hf_config: PretrainedConfig, dim: int,
              positions: torch.Tensor) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3): per-frequency rescaling by short_factor within the original context and by long_factor
    beyond it, chosen per position so that a key's rotation never depends on its batch mates. This is transformers'
    cached forward, step by step; its `generate` re-encodes every position with long_factor once the sequence
    outgrows the original context, and vLLM switches the whole batch when any position in it has.
    -> (freqs [P, dim/2], attention scaling)."""
    original = params["original_max_position_embeddings"] or hf_config.max_position_embeddings
    factor = params.get("factor") or hf_config.max_position_embeddings / original
    scaling = params.get("attention_factor")
    if scaling is None:
        scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    short, long = (1.0 / (torch.tensor(params[key], dtype=torch.float32) * params["rope_theta"] ** exponents)
                   for key in ("short_factor", "long_factor"))
    inv_freq = torch.where((positions < original)[:, None], short[None, :], long[None, :])
    return positions[:, None] * inv_freq, float(scaling)


def cos_sin_cache(hf_config: PretrainedConfig, head_dim: int, max_positions: int,
                  layer_type: str | None = None) -> torch.Tensor:
    """float32 [max_positions, rotary_dim]: row p = cat(cos(p * inv_freq), sin(p * inv_freq)) * attention
    scaling, for the rotated channels of a head (all of them unless partial_rotary_factor < 1)."""
    dim = rotary_dim(hf_config, head_dim, layer_type)
    positions = torch.arange(max_positions, dtype=torch.float32)
    params = rope_parameters(hf_config, layer_type)
    if params["rope_type"] == "longrope":
        freqs, scaling = _longrope(params, hf_config, dim, positions)
    else:
        inv_freq, scaling = inv_freq_and_scaling(hf_config, dim, layer_type)
        freqs = positions[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos() * scaling, freqs.sin() * scaling), dim=-1)
