"""Triton paged attention over the block-table KV cache, with GQA.

Decode (one query per sequence) runs split-K: each program takes one (sequence, KV head, split) and all the query heads
that share that KV head, so every K/V tile is read from memory once; a reduce kernel merges the splits by their
log-sum-exp. Prefill is varlen causal attention: query rows of many sequences are packed, keys come from the paged
cache (already stored), so cached prefixes and earlier prefill chunks are attended like any other key.
Both use online softmax in base 2 with fp32 accumulators.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lmport.kernels.triton_common import INTERPRET, check_last_dim_contiguous

MIN_SPLIT_TOKENS = 256  # a decode split shorter than this costs more in the reduce than it wins in parallelism
MAX_SPLITS = 32


@triton.jit
def _attend_range(q, acc, l_i, m_i, lo, hi, limit, first, load_first, k_head_ptr, v_head_ptr, table_ptr,
                  stride_kb, stride_kt, stride_vb, stride_vt, d, d_mask, scale_log2, cap_log2,
                  BLOCK_N: tl.constexpr, PAGE: tl.constexpr, MASKED: tl.constexpr, DOT_F32: tl.constexpr,
                  CAPPED: tl.constexpr):
    """Online softmax over keys lo..hi-1, gathered through the block table in BLOCK_N tiles.

    MASKED=False is the bulk: whole tiles every query row sees, loaded and scored without predicates. MASKED=True takes
    the tail: keys at or past hi are not loaded, and a row only sees keys first <= n <= limit (its sliding window's
    start and its absolute position; both broadcast against the [rows, BLOCK_N] scores), and keys before load_first
    (the earliest any row sees: their blocks may be freed) are not loaded. A row may see no key of a
    masked tile: its running max stays -inf and contributes nothing. CAPPED: scores (base 2) become
    cap_log2 * tanh(s / cap_log2), i.e. soft_cap * tanh(q.k * scale / soft_cap) in natural units.
    """
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        tok = n % PAGE
        if MASKED:
            n_mask = (n < hi) & (n >= load_first)
            page = tl.load(table_ptr + n // PAGE, mask=n_mask, other=0).to(tl.int64)
            kv_mask = n_mask[:, None] & d_mask[None, :]
        else:
            page = tl.load(table_ptr + n // PAGE).to(tl.int64)
            kv_mask = d_mask[None, :]
        k = tl.load(k_head_ptr + (page * stride_kb + tok * stride_kt)[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_head_ptr + (page * stride_vb + tok * stride_vt)[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        else:  # an fp8 cache's entries (a no-op in the model dtype); its scales are applied outside the loop
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        if CAPPED:
            s = cap_log2 * (2.0 * tl.sigmoid(2.0 * s / cap_log2) - 1.0)  # tanh, from sigmoid (no tl.tanh everywhere)
        if MASKED:
            s = tl.where((n[None, :] <= limit) & (n[None, :] >= first) & n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = m_new
        if MASKED:  # a row with no visible key yet: subtract 0, not -inf (exp2(-inf - -inf) is NaN)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _split_tokens(seq_len, num_splits, BLOCK_N: tl.constexpr):
    """Keys per decode split: the context cut into num_splits parts, rounded up to whole tiles."""
    return tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N


# num_splits is a run-time argument (not specialised on its value), so a new split count — the block-table width
# grows with the longest sequence outside CUDA graphs — launches the kernels already compiled instead of new ones.
@triton.jit(do_not_specialize=["num_splits"])
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_out_ptr,
                   part_lse_ptr, scale_log2, cap_log2, window, num_q_heads, num_splits,
                   stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                   stride_bt, stride_ob, stride_oh,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
                   WINDOWED: tl.constexpr, CAPPED: tl.constexpr):
    """SPLIT=False (num_splits == 1): write the output directly; True: write partials for the reduce kernel.
    WINDOWED: only keys >= seq_len - window are seen; tiles before the window are never loaded."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    per_split = _split_tokens(seq_len, num_splits, BLOCK_N)
    start = split * per_split
    if start >= seq_len:  # short context: this split has no keys, and the reduce does not read it
        return
    end = tl.minimum(start + per_split, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    table_ptr = block_tables_ptr + b.to(tl.int64) * stride_bt
    k_head_ptr = k_cache_ptr + kv_head * stride_kh
    v_head_ptr = v_cache_ptr + kv_head * stride_vh
    if WINDOWED:  # every tile through the mask, from the tile holding the window's first key
        first = tl.maximum(seq_len - window, 0)
        lo = tl.maximum(start, first // BLOCK_N * BLOCK_N)
        acc, l_i, m_i = _attend_range(q, acc, l_i, m_i, lo, end, end - 1, first, first, k_head_ptr, v_head_ptr, table_ptr,
                                      stride_kb, stride_kt, stride_vb, stride_vt, d, d_mask, scale_log2, cap_log2,
                                      BLOCK_N, PAGE, True, DOT_F32, CAPPED)
    else:
        full = start + (end - start) // BLOCK_N * BLOCK_N  # whole tiles, then at most one partial tile
        acc, l_i, m_i = _attend_range(q, acc, l_i, m_i, start, full, end - 1, 0, 0, k_head_ptr, v_head_ptr, table_ptr,
                                      stride_kb, stride_kt, stride_vb, stride_vt, d, d_mask, scale_log2, cap_log2,
                                      BLOCK_N, PAGE, False, DOT_F32, CAPPED)
        acc, l_i, m_i = _attend_range(q, acc, l_i, m_i, full, end, end - 1, 0, 0, k_head_ptr, v_head_ptr, table_ptr,
                                      stride_kb, stride_kt, stride_vb, stride_vt, d, d_mask, scale_log2, cap_log2,
                                      BLOCK_N, PAGE, True, DOT_F32, CAPPED)
    # a split wholly before the window saw nothing: partial 0 with log-sum-exp -inf, which the reduce weighs 0
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if not SPLIT:
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        row = (b.to(tl.int64) * num_q_heads + heads) * num_splits + split  # part_* are [B, Hq, num_splits(, D)]
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=out_mask)
        tl.store(part_lse_ptr + row, m_i + tl.log2(l_i), mask=g_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(part_out_ptr, part_lse_ptr, seq_lens_ptr, out_ptr, num_q_heads, num_splits,
                          stride_ob, stride_oh,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_S: tl.constexpr):
    """BLOCK_S >= num_splits: the splits are loaded as one masked tile (see _reduce_block_s)."""
    b = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    num_active = tl.cdiv(seq_len, _split_tokens(seq_len, num_splits, BLOCK_N))
    s = tl.arange(0, BLOCK_S)
    s_mask = s < num_active
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    row = (b.to(tl.int64) * num_q_heads + head) * num_splits + s
    lse = tl.load(part_lse_ptr + row, mask=s_mask, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))
    parts = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=s_mask[:, None] & d_mask[None, :],
                    other=0.0)
    out = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d_mask)


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, cu_seqlens_q_ptr, seq_lens_ptr, block_tables_ptr, out_ptr,
                    scale_log2, cap_log2, window,
                    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                    stride_bt, stride_ot, stride_oh,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, DOT_F32: tl.constexpr, WINDOWED: tl.constexpr,
                    CAPPED: tl.constexpr):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # causal: the last tiles do the most work, start them first
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:  # the grid is sized for the longest query of the batch
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # cached prefix / earlier chunks: keys already in the cache before these queries

    m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < q_len
    pos = context + m  # absolute position of each query row
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    rows = (q_start + m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    kv_head = head // GROUP
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head_ptr = k_cache_ptr + kv_head * stride_kh
    v_head_ptr = v_cache_ptr + kv_head * stride_vh
    # Keys below the tile's first position are seen by every row (no mask); the rest, up to the tile's last row, go
    # through the causal mask. Every row sees key 0, so no row is ever fully masked and the running max stays finite.
    kv_end = tl.minimum(seq_len, context + (tile + 1) * BLOCK_M)
    if WINDOWED:  # row p sees keys p - window + 1 .. p: start at the tile holding the first row's first key
        first = tl.maximum(context + tile * BLOCK_M - window + 1, 0)
        acc, l_i, m_i = _attend_range(q, acc, l_i, m_i, first // BLOCK_N * BLOCK_N, kv_end, pos[:, None],
                                      pos[:, None] - window + 1, first, k_head_ptr, v_head_ptr, table_ptr, stride_kb, stride_kt, stride_vb, stride_vt,
                                      d, d_mask, scale_log2, cap_log2, BLOCK_N, PAGE, True, DOT_F32, CAPPED)
    else:
        full = (context + tile * BLOCK_M) // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _attend_range(q, acc, l_i, m_i, 0, full, 0, 0, 0, k_head_ptr, v_head_ptr, table_ptr,
                                      stride_kb, stride_kt, stride_vb, stride_vt, d, d_mask, scale_log2, cap_log2,
                                      BLOCK_N, PAGE, False, DOT_F32, CAPPED)
        acc, l_i, m_i = _attend_range(q, acc, l_i, m_i, full, kv_end, pos[:, None], 0, 0, k_head_ptr, v_head_ptr,
                                      table_ptr, stride_kb, stride_kt, stride_vb, stride_vt, d, d_mask, scale_log2,
                                      cap_log2, BLOCK_N, PAGE, True, DOT_F32, CAPPED)
    out = acc / tl.maximum(l_i, 1e-30)[:, None]  # rows past q_len saw nothing (l_i 0): not stored, but no 0/0
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])


LOG2E = 1.4426950408889634


def decode_num_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Enough splits to give every SM two programs, at most MAX_SPLITS, none under MIN_SPLIT_TOKENS keys.

    max_context comes from the block-table width (known on the host), not seq_lens, so choosing never syncs the GPU.
    """
    wanted = triton.cdiv(2 * num_sms, batch * num_kv_heads)
    return max(1, min(wanted, MAX_SPLITS, triton.cdiv(max_context, MIN_SPLIT_TOKENS)))


def _reduce_block_s(num_splits: int) -> int:
    """The reduce kernel's split tile: MAX_SPLITS for every heuristic split count (one compiled variant), the next
    power of two for a larger explicit num_splits."""
    return max(MAX_SPLITS, triton.next_power_of_2(num_splits))


def num_sms(device: torch.device) -> int:
    """SMs to fill; the interpreter runs programs one by one, so on CPU there is nothing to fill."""
    return _cuda_sms(device) if device.type == "cuda" else 0


@functools.cache
def _cuda_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _decode_config(dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for decode: a memory-bound stream of K/V tiles, several in flight."""
    if INTERPRET:  # tiny tiles so the CPU tests cover several tiles per split
        return 16, 4, 1
    if dtype == torch.float32:  # IEEE fp32 dot runs on FMA units: smaller tiles keep registers in check
        return 32, 4, 2
    return 64, 4, 3


def _prefill_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for prefill: compute-bound tensor-core tiles."""
    if INTERPRET:  # tiny tiles so the CPU tests cover several query and key tiles per sequence
        return 16, 16, 4, 1
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if head_dim <= 64:
        return 128, 64, 4, 3
    return 128, 64, 8, 3


def _check_inputs(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor) -> tuple[int, int]:
    """-> (block_size, num_kv_heads) after the checks both attention entry points need."""
    _, page, num_kv_heads, _ = k_cache.shape
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of KV heads ({num_kv_heads})")
    check_last_dim_contiguous("q", q)
    check_last_dim_contiguous("block_tables", block_tables)
    return page, num_kv_heads


def _cache_strides(cache: torch.Tensor) -> tuple[int, int, int]:
    check_last_dim_contiguous("k_cache/v_cache", cache)
    return cache.stride(0), cache.stride(1), cache.stride(2)


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           k_scale: float = 1.0, v_scale: float = 1.0, *,
                           out: torch.Tensor | None = None, num_splits: int | None = None) -> torch.Tensor:
    """q [B, Hq, D] -> [B, Hq, D]; `out` may be preallocated, `num_splits` overrides the split-K heuristic.
    k_scale folds into the score scale; v_scale multiplies the output (softmax weights sum to 1)."""
    batch, num_q_heads, head_dim = q.shape
    page, num_kv_heads = _check_inputs(q, k_cache, block_tables)
    out = torch.empty_like(q) if out is None else out
    if batch == 0:
        return out
    block_n, num_warps, num_stages = _decode_config(q.dtype)
    if num_splits is None:
        num_splits = decode_num_splits(batch, num_kv_heads, block_tables.shape[1] * page, num_sms(q.device))
    group = num_q_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    if num_splits > 1:
        part_out = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused: the kernel writes the result directly
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse, scale * k_scale * LOG2E,
        (soft_cap or 0.0) * LOG2E, sliding_window or 0, num_q_heads, num_splits,
        q.stride(0), q.stride(1), *_cache_strides(k_cache), *_cache_strides(v_cache),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d,
        BLOCK_N=block_n, PAGE=page, SPLIT=num_splits > 1, DOT_F32=INTERPRET, WINDOWED=sliding_window is not None,
        CAPPED=soft_cap is not None, num_warps=num_warps, num_stages=num_stages)
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_q_heads)](
            part_out, part_lse, seq_lens, out, num_q_heads, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_S=_reduce_block_s(num_splits), num_warps=4)
    return out.mul_(v_scale) if v_scale != 1.0 else out


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                            max_query_len: int, scale: float, sliding_window: int | None = None,
                            soft_cap: float | None = None, k_scale: float = 1.0, v_scale: float = 1.0, *,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """q [N, Hq, D] packed by cu_seqlens_q -> [N, Hq, D]; `out` may be preallocated; scales as in decode.

    The grid is sized by max_query_len; each program stops at its own sequence's keys.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    page, num_kv_heads = _check_inputs(q, k_cache, block_tables)
    out = torch.empty_like(q) if out is None else out
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_m, block_n, num_warps, num_stages = _prefill_config(head_dim, q.dtype)
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_q_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, out, scale * k_scale * LOG2E,
        (soft_cap or 0.0) * LOG2E,
        sliding_window or 0,
        q.stride(0), q.stride(1), *_cache_strides(k_cache), *_cache_strides(v_cache),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=block_n, PAGE=page, DOT_F32=INTERPRET,
        WINDOWED=sliding_window is not None, CAPPED=soft_cap is not None, num_warps=num_warps,
        num_stages=num_stages)
    return out.mul_(v_scale) if v_scale != 1.0 else out
