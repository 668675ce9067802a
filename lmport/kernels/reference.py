"""PyTorch reference kernels: the CPU path runs these, and every Triton kernel is tested against them.

Cache layout: k_cache / v_cache are [num_blocks, block_size, num_kv_heads, head_dim];
slot = block * block_size + offset. A cache may hold a narrower type than the model's (an fp8 KV cache,
kv_cache_dtype="fp8"): it then stores K / k_scale and V / v_scale, saturated to the type's finite range, and every
read multiplies the scale back in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x as a cache of cache_dtype stores it: unchanged in the model's own type, else x / scale saturated to the
    type's largest finite value (e4m3fn has no infinity, so an overflow would otherwise read back as NaN)."""
    if cache_dtype == x.dtype:
        return x
    limit = torch.finfo(cache_dtype).max
    return (x.float() / scale).clamp(-limit, limit).to(cache_dtype)


def byte_view(cache: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as uint8: PyTorch's CPU index_copy_/index_select have no float8 kernels; copying bytes is exact."""
    return cache.view(torch.uint8) if cache.dtype in FP8_DTYPES else cache


def store_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    if bool((slot_mapping < 0).any()):  # padded slots are skipped, not written
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    for cache, rows, scale in ((k_cache, key, k_scale), (v_cache, value, v_scale)):
        byte_view(cache).view(-1, num_kv_heads, head_dim).index_copy_(
            0, slot_mapping, byte_view(quantize_kv(rows, cache.dtype, scale)))


def _gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor, dtype: torch.dtype,
                   scale: float = 1.0) -> torch.Tensor:
    """[S, M] block tables -> [S, M * block_size, num_kv_heads, head_dim] in dtype, contiguous per sequence."""
    num_seqs, max_blocks = block_tables.shape
    _, block_size, num_kv_heads, head_dim = cache.shape
    flat = byte_view(cache).flatten(1).index_select(0, block_tables.flatten().long()).view(cache.dtype)
    if cache.dtype != dtype:
        flat = (flat.float() * scale).to(dtype)
    return flat.view(num_seqs, max_blocks * block_size, num_kv_heads, head_dim)


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor | None,
            is_causal: bool, scale: float, soft_cap: float | None) -> torch.Tensor:
    """SDPA over [B, H, n, D] queries and [B, Hkv, L, D] keys where `visible` (broadcast to [B, 1, n, L]) or the
    causal mask says; with soft_cap, scores = soft_cap * tanh(q.k * scale / soft_cap) first (SDPA has no hook for it,
    so the scores are materialised)."""
    if soft_cap is None:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=visible, is_causal=is_causal,
                                              scale=scale, enable_gqa=True)
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = torch.tanh((query.float() @ keys.float().transpose(-1, -2)) * (scale / soft_cap)) * soft_cap
    if is_causal:
        visible = torch.ones(scores.shape[-2:], dtype=torch.bool, device=query.device).tril()
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ values.float()).to(query.dtype)


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    # Entries wholly before a window may be -1 (freed blocks): read block 0 there instead, masked like them.
    block_tables = block_tables.clamp(min=0) if sliding_window is not None else block_tables
    keys = _gather_blocks(k_cache, block_tables, q.dtype, k_scale).transpose(1, 2)  # [B, Hkv, L, D]
    values = _gather_blocks(v_cache, block_tables, q.dtype, v_scale).transpose(1, 2)
    positions = torch.arange(keys.shape[2], device=q.device)
    lens = seq_lens[:, None].to(positions.dtype)
    visible = positions[None, :] < lens
    if sliding_window is not None:
        visible &= positions[None, :] >= lens - sliding_window
    return _attend(q.unsqueeze(2), keys, values, visible[:, None, None, :], False, scale, soft_cap).squeeze(2)


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                            max_query_len: int, scale: float, sliding_window: int | None = None,
                            soft_cap: float | None = None, k_scale: float = 1.0,
                            v_scale: float = 1.0) -> torch.Tensor:
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    for s, (start, end, seq_len) in enumerate(zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(),
                                                  seq_lens.tolist())):
        num_queries = end - start
        # Keys from the block holding the first query's first visible key: the blocks before a window are never
        # read (they may be freed), so a long context costs window-sized work.
        first_key = max(0, seq_len - num_queries - sliding_window + 1) if sliding_window is not None else 0
        first_block = first_key // block_size
        lo = first_block * block_size  # absolute position of the first gathered key
        table = block_tables[s, first_block:-(-seq_len // block_size)]
        # 4-D inputs ([1, heads, len, D]): on CPU, 3-D ones fall back to SDPA's unfused math path (~7x slower).
        keys = _gather_blocks(k_cache, table[None], q.dtype, k_scale)[:, :seq_len - lo].transpose(1, 2)
        values = _gather_blocks(v_cache, table[None], q.dtype, v_scale)[:, :seq_len - lo].transpose(1, 2)
        query = q[start:end].transpose(0, 1)[None]  # [1, Hq, n, D]
        if num_queries == seq_len and sliding_window is None:
            attn = _attend(query, keys, values, None, True, scale, soft_cap)
        else:  # cached context precedes the new queries (the causal diagonal shifts by seq_len - num_queries), or a
            # window hides keys more than sliding_window - 1 positions back; rows and cols count from lo
            rows = torch.arange(num_queries, device=q.device)[:, None] + (seq_len - num_queries - lo)
            cols = torch.arange(seq_len - lo, device=q.device)[None, :]
            visible = cols <= rows
            if sliding_window is not None:
                visible &= cols > rows - sliding_window
            attn = _attend(query, keys, values, visible, False, scale, soft_cap)
        out[start:end] = attn[0].transpose(0, 1)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    # Same operation order as transformers' LlamaRMSNorm: add in the model dtype, normalise in fp32.
    if residual is not None:
        x = x + residual
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return normed if residual is None else (normed, x)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin_cache.index_select(0, positions).to(q.dtype).chunk(2, dim=-1)  # [N, D/2] each
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], -1, head_dim)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(1)

    return rotate(q), rotate(k)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
