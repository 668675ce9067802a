"""Triton neox-style rotary embedding, applied in place to q and k (one program per token)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmport.kernels.triton_common import check_last_dim_contiguous


@triton.jit
def _rotate_heads(ptr, num_heads, cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate every head of one token row in place: (x1, x2) -> (x1*cos - x2*sin, x2*cos + x1*sin)."""
    h = tl.arange(0, BLOCK_H)
    c = tl.arange(0, BLOCK_HALF)
    mask = (h[:, None] < num_heads) & (c[None, :] < HALF)
    first = ptr + h[:, None] * (2 * HALF) + c[None, :]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(first, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(first + HALF, (b * cos + a * sin).to(x2.dtype), mask=mask)


@triton.jit
def _rope_kernel(positions_ptr, q_ptr, k_ptr, cos_sin_ptr, num_q_heads, num_kv_heads, stride_q, stride_k, stride_cs,
                 HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token)
    c = tl.arange(0, BLOCK_HALF)
    c_mask = c < HALF
    row = cos_sin_ptr + pos * stride_cs
    # Rounded to q's dtype first, like the reference (and transformers, which casts cos/sin to the model dtype).
    cos = tl.load(row + c, mask=c_mask, other=0.0).to(q_ptr.dtype.element_ty).to(tl.float32)[None, :]
    sin = tl.load(row + HALF + c, mask=c_mask, other=0.0).to(q_ptr.dtype.element_ty).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + token * stride_q, num_q_heads, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr + token * stride_k, num_kv_heads, cos, sin, HALF, BLOCK_HK, BLOCK_HALF)


def _num_heads(name: str, x: torch.Tensor, head_dim: int) -> int:
    """x is [N, H*D]: token rows addressed by stride (a view of a fused qkv is fine), heads packed within a row."""
    check_last_dim_contiguous(name, x)
    if x.dim() != 2 or x.shape[1] % head_dim:
        raise ValueError(f"{name} must be [num_tokens, num_heads * {head_dim}], got shape {tuple(x.shape)}")
    return x.shape[1] // head_dim


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [N, Hq*D] and k [N, Hkv*D] in place at `positions`; returns them. Row = cat(cos[D/2], sin[D/2])."""
    num_q_heads, num_kv_heads = _num_heads("q", q, head_dim), _num_heads("k", k, head_dim)
    check_last_dim_contiguous("cos_sin_cache", cos_sin_cache)
    num_tokens = positions.shape[0]
    if num_tokens:
        half = head_dim // 2
        _rope_kernel[(num_tokens,)](
            positions, q, k, cos_sin_cache, num_q_heads, num_kv_heads, q.stride(0), k.stride(0),
            cos_sin_cache.stride(0), HALF=half, BLOCK_HQ=triton.next_power_of_2(num_q_heads),
            BLOCK_HK=triton.next_power_of_2(num_kv_heads), BLOCK_HALF=triton.next_power_of_2(half), num_warps=4)
    return q, k
