"""Triton store of new K/V rows into the paged cache through the slot mapping (slot -1 = padding, skipped).
An fp8 cache gets K / k_scale and V / v_scale, saturated to its finite range (as reference.quantize_kv)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmport.kernels.triton_common import check_last_dim_contiguous


@triton.jit
def _store_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, num_kv_heads, k_scale, v_scale,
                     stride_kn, stride_kh, stride_vn, stride_vh, stride_kcb, stride_kct, stride_kch,
                     stride_vcb, stride_vct, stride_vch,
                     HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                     QUANT_MAX: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:
        return
    page = slot // PAGE
    offset = slot % PAGE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < num_kv_heads) & (d[None, :] < HEAD_DIM)
    row = token.to(tl.int64)
    k = tl.load(key_ptr + row * stride_kn + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(value_ptr + row * stride_vn + h[:, None] * stride_vh + d[None, :], mask=mask)
    if QUANT_MAX > 0:  # a narrower cache type: scale, then saturate
        k = tl.clamp(k.to(tl.float32) / k_scale, -QUANT_MAX, QUANT_MAX).to(k_cache_ptr.dtype.element_ty)
        v = tl.clamp(v.to(tl.float32) / v_scale, -QUANT_MAX, QUANT_MAX).to(v_cache_ptr.dtype.element_ty)
    tl.store(k_cache_ptr + page * stride_kcb + offset * stride_kct + h[:, None] * stride_kch + d[None, :], k,
             mask=mask)
    tl.store(v_cache_ptr + page * stride_vcb + offset * stride_vct + h[:, None] * stride_vch + d[None, :], v,
             mask=mask)


def store_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """key/value [N, Hkv, D] -> k_cache/v_cache [num_blocks, block_size, Hkv, D] at slot_mapping (int64 [N])."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    for name, tensor in (("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_last_dim_contiguous(name, tensor)
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, num_kv_heads, float(k_scale), float(v_scale),
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        HEAD_DIM=head_dim, PAGE=k_cache.shape[1], BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        QUANT_MAX=torch.finfo(k_cache.dtype).max if k_cache.dtype != key.dtype else 0.0, num_warps=4)
