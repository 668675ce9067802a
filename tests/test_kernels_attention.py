"""Paged attention: the reference against a naive dense implementation, the Triton kernels and the CPU C++ prefill
kernel against the reference.

The Triton kernels run on the GPU if there is one, else in the interpreter on CPU. They read a cache whose unused
slots (padding table entries, the tail of each last block, blocks of no sequence) are NaN, so a single read past a
sequence's keys fails the test.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernel_helpers import (
    DEVICE,
    TOLERANCE,
    enable_triton_interpreter,
    fresh_seed,
    make_paged_case,
    poisoned,
    rel_error,
)

enable_triton_interpreter()

from lmport.kernels import cpu, reference, triton_attention  # noqa: E402

# (num_kv_heads, GQA group, head_dim, block_size): ratios 1 and 3, a non-power-of-two head_dim, two page sizes
HEAD_CONFIGS = [(2, 1, 32, 16), (1, 3, 16, 8), (4, 1, 64, 8), (1, 3, 48, 16)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DECODE_LENS = [1, 17, 45, 32]  # a lone token, partial last blocks, an exact multiple of both page sizes
# (cached context, new queries): plain prefills, a prefix-cache hit (one full block cached), a chunk after a partial
# block, and a single new token after a long context
PREFILL_CHUNKS = [(0, 1), (0, 33), (16, 9), (20, 13), (40, 1)]
if DEVICE.type == "cuda":
    # The GPU tiles (decode BLOCK_N 64; prefill BLOCK_M 128, BLOCK_N 64) are longer than the interpreter's 16, so the
    # short cases above never reach the unmasked bulk loop, a second query tile or a split with several tiles there.
    DECODE_LENS += [300, 1000]
    PREFILL_CHUNKS += [(300, 200)]


def naive_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                    sliding_window: int | None = None, soft_cap: float | None = None) -> torch.Tensor:
    """q [n, Hq, D] are the last n positions of a sequence whose contiguous K/V are [L, Hkv, D]; float64 loops."""
    q = q.cpu()
    num_queries, num_q_heads, _ = q.shape
    group = num_q_heads // keys.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(num_queries):
        visible = keys.shape[0] - num_queries + i + 1
        first = max(0, visible - sliding_window) if sliding_window else 0
        for h in range(num_q_heads):
            k, v = keys[first:visible, h // group].double(), values[first:visible, h // group].double()
            scores = k @ q[i, h].double() * scale
            if soft_cap is not None:
                scores = torch.tanh(scores / soft_cap) * soft_cap
            out[i, h] = torch.softmax(scores, dim=0) @ v
    return out


def decode_inputs(num_kv_heads: int, group: int, head_dim: int, block_size: int, dtype: torch.dtype):
    case = make_paged_case(DECODE_LENS, block_size, num_kv_heads, head_dim, dtype)
    q = torch.randn(len(DECODE_LENS), num_kv_heads * group, head_dim).to(DEVICE, dtype)
    return case, q, head_dim ** -0.5


def prefill_inputs(num_kv_heads: int, group: int, head_dim: int, block_size: int, dtype: torch.dtype,
                   chunks: list[tuple[int, int]] = PREFILL_CHUNKS):
    case = make_paged_case([c + n for c, n in chunks], block_size, num_kv_heads, head_dim, dtype)
    num_q_heads = num_kv_heads * group
    cu = torch.tensor([0] + [n for _, n in chunks], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu = cu.to(DEVICE)
    # q as the kernels get it from a fused qkv projection: a strided view, rows wider than Hq * D
    qkv = torch.randn(int(cu[-1]), (num_q_heads + 2 * num_kv_heads) * head_dim).to(DEVICE, dtype)
    q = qkv[:, :num_q_heads * head_dim].view(-1, num_q_heads, head_dim)
    return case, q, cu, head_dim ** -0.5


@pytest.mark.parametrize("heads", HEAD_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_decode_matches_naive(heads, dtype):
    seed = fresh_seed()
    case, q, scale = decode_inputs(*heads, dtype)
    out = reference.paged_attention_decode(q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, scale)
    for b, (keys, values) in enumerate(zip(case.keys, case.values)):
        err = rel_error(out[b:b + 1], naive_attention(q[b:b + 1], keys, values, scale))
        assert err < TOLERANCE[dtype], f"seed={seed} seq={b} rel_error={err:.3g}"


@pytest.mark.parametrize("heads", HEAD_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_prefill_matches_naive(heads, dtype):
    seed = fresh_seed()
    case, q, cu, scale = prefill_inputs(*heads, dtype)
    out = reference.paged_attention_prefill(q, case.k_cache, case.v_cache, cu, case.seq_lens, case.block_tables,
                                            max(n for _, n in PREFILL_CHUNKS), scale)
    for s, (keys, values) in enumerate(zip(case.keys, case.values)):
        rows = slice(int(cu[s]), int(cu[s + 1]))
        err = rel_error(out[rows], naive_attention(q[rows], keys, values, scale))
        assert err < TOLERANCE[dtype], f"seed={seed} seq={s} chunk={PREFILL_CHUNKS[s]} rel_error={err:.3g}"


@pytest.mark.parametrize("heads", HEAD_CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_decode_matches_reference(heads, dtype):
    seed = fresh_seed()
    case, q, scale = decode_inputs(*heads, dtype)
    expected = reference.paged_attention_decode(q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
                                                scale)
    nan_case = case.with_unused(float("nan"))
    # 1: no split; 3: every sequence split across up to 3 programs; 4: the longest leaves one split empty
    for num_splits in (1, 3, 4):
        out = poisoned(q.shape, dtype)
        triton_attention.paged_attention_decode(q, nan_case.k_cache, nan_case.v_cache, case.block_tables,
                                                case.seq_lens, scale, out=out, num_splits=num_splits)
        err = rel_error(out, expected)
        assert err < TOLERANCE[dtype], f"seed={seed} num_splits={num_splits} rel_error={err:.3g}"


@pytest.mark.parametrize("heads", HEAD_CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_prefill_matches_reference(heads, dtype):
    seed = fresh_seed()
    case, q, cu, scale = prefill_inputs(*heads, dtype)
    max_query_len = max(n for _, n in PREFILL_CHUNKS)
    expected = reference.paged_attention_prefill(q, case.k_cache, case.v_cache, cu, case.seq_lens, case.block_tables,
                                                 max_query_len, scale)
    nan_case = case.with_unused(float("nan"))
    out = poisoned(q.shape, dtype)
    triton_attention.paged_attention_prefill(q, nan_case.k_cache, nan_case.v_cache, cu, case.seq_lens,
                                             case.block_tables, max_query_len, scale, out=out)
    for s in range(len(PREFILL_CHUNKS)):
        rows = slice(int(cu[s]), int(cu[s + 1]))
        err = rel_error(out[rows], expected[rows])
        assert err < TOLERANCE[dtype], f"seed={seed} seq={s} chunk={PREFILL_CHUNKS[s]} rel_error={err:.3g}"


# windows of one key, unaligned to any tile, and longer than some contexts; soft caps that bite (scores are ~N(0, 9))
WINDOW_CASES = [(1, None), (7, None), (20, 2.0), (None, 1.5)]


@pytest.mark.parametrize("window,soft_cap", WINDOW_CASES)
@pytest.mark.parametrize("heads", [(1, 3, 16, 8), (2, 1, 32, 16)])
def test_windowed_and_capped_decode_reference_and_triton(window, soft_cap, heads):
    seed = fresh_seed()
    case, q, scale = decode_inputs(*heads, torch.float32)
    q = q * 3
    # blocks wholly before each window freed: table entries -1 (the reference reads them masked, so keep them finite)
    first_keys = [max(0, n - (window or n)) for n in case.seq_lens.tolist()]
    freed = case.with_blocks_before(first_keys, 0.0)
    expected = reference.paged_attention_decode(q, freed.k_cache, freed.v_cache, freed.block_tables, case.seq_lens,
                                                scale, sliding_window=window, soft_cap=soft_cap)
    for b, (keys, values) in enumerate(zip(case.keys, case.values)):
        err = rel_error(expected[b:b + 1], naive_attention(q[b:b + 1], keys, values, scale, window, soft_cap))
        assert err < TOLERANCE[torch.float32], f"reference seed={seed} seq={b} rel_error={err:.3g}"
    nan_case = case.with_unused(float("nan")).with_blocks_before(first_keys, float("nan"))
    for num_splits in (1, 3):  # 3: early splits fall wholly before a short window
        out = poisoned(q.shape, torch.float32)
        triton_attention.paged_attention_decode(q, nan_case.k_cache, nan_case.v_cache, nan_case.block_tables,
                                                case.seq_lens, scale, window, soft_cap, out=out,
                                                num_splits=num_splits)
        err = rel_error(out, expected)
        assert err < TOLERANCE[torch.float32], f"triton seed={seed} num_splits={num_splits} rel_error={err:.3g}"


@pytest.mark.parametrize("window,soft_cap", WINDOW_CASES)
@pytest.mark.parametrize("heads", [(1, 3, 16, 8), (2, 1, 32, 16)])
def test_windowed_and_capped_prefill_reference_and_triton(window, soft_cap, heads):
    seed = fresh_seed()
    case, q, cu, scale = prefill_inputs(*heads, torch.float32)
    q = q * 3
    max_query_len = max(n for _, n in PREFILL_CHUNKS)
    # the first query of a chunk after `context` cached keys sees keys from context - window + 1: the blocks wholly
    # before that are NaN with table entries -1, and neither the reference nor Triton may read them
    first_keys = [max(0, context - (window or context + 1) + 1) for context, _ in PREFILL_CHUNKS]
    nan_case = case.with_unused(float("nan")).with_blocks_before(first_keys, float("nan"))
    expected = reference.paged_attention_prefill(q, nan_case.k_cache, nan_case.v_cache, cu, case.seq_lens,
                                                 nan_case.block_tables, max_query_len, scale, sliding_window=window,
                                                 soft_cap=soft_cap)
    out = poisoned(q.shape, torch.float32)
    triton_attention.paged_attention_prefill(q, nan_case.k_cache, nan_case.v_cache, cu, case.seq_lens,
                                             nan_case.block_tables, max_query_len, scale, window, soft_cap, out=out)
    for s, (keys, values) in enumerate(zip(case.keys, case.values)):
        rows = slice(int(cu[s]), int(cu[s + 1]))
        err = rel_error(expected[rows], naive_attention(q[rows], keys, values, scale, window, soft_cap))
        assert err < TOLERANCE[torch.float32], f"reference seed={seed} chunk={PREFILL_CHUNKS[s]} rel_error={err:.3g}"
        err = rel_error(out[rows], expected[rows])
        assert err < TOLERANCE[torch.float32], f"triton seed={seed} chunk={PREFILL_CHUNKS[s]} rel_error={err:.3g}"


# The C++ kernel's tiles are 16 query positions and 16 keys: these add several query tiles, tiles straddling the
# cached context, and a prompt whose key tiles start mid-block
CPU_PREFILL_CHUNKS = PREFILL_CHUNKS + [(0, 100), (37, 70), (5, 16)]


@pytest.mark.parametrize("heads", HEAD_CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_prefill_matches_reference(heads, dtype):
    assert cpu.available()
    seed = fresh_seed()
    case, q, cu, scale = prefill_inputs(*heads, dtype, chunks=CPU_PREFILL_CHUNKS)
    max_query_len = max(n for _, n in CPU_PREFILL_CHUNKS)
    expected = reference.paged_attention_prefill(q, case.k_cache, case.v_cache, cu, case.seq_lens, case.block_tables,
                                                 max_query_len, scale)
    nan_case = case.with_unused(float("nan"))
    out = cpu.paged_attention_prefill(q, nan_case.k_cache, nan_case.v_cache, cu, case.seq_lens, case.block_tables,
                                      max_query_len, scale)
    for s in range(len(CPU_PREFILL_CHUNKS)):
        rows = slice(int(cu[s]), int(cu[s + 1]))
        err = rel_error(out[rows], expected[rows])
        assert err < TOLERANCE[dtype], f"seed={seed} seq={s} chunk={CPU_PREFILL_CHUNKS[s]} rel_error={err:.3g}"


@pytest.mark.parametrize("window,soft_cap", WINDOW_CASES)
@pytest.mark.parametrize("heads", [(1, 3, 16, 8), (2, 1, 32, 16)])
def test_windowed_and_capped_cpu_prefill(window, soft_cap, heads):
    seed = fresh_seed()
    case, q, cu, scale = prefill_inputs(*heads, torch.float32, chunks=CPU_PREFILL_CHUNKS)
    q = q * 3
    max_query_len = max(n for _, n in CPU_PREFILL_CHUNKS)
    first_keys = [max(0, context - (window or context + 1) + 1) for context, _ in CPU_PREFILL_CHUNKS]
    nan_case = case.with_unused(float("nan")).with_blocks_before(first_keys, float("nan"))
    out = cpu.paged_attention_prefill(q, nan_case.k_cache, nan_case.v_cache, cu, case.seq_lens,
                                      nan_case.block_tables, max_query_len, scale, window, soft_cap)
    for s, (keys, values) in enumerate(zip(case.keys, case.values)):
        rows = slice(int(cu[s]), int(cu[s + 1]))
        err = rel_error(out[rows], naive_attention(q[rows], keys, values, scale, window, soft_cap))
        assert err < TOLERANCE[torch.float32], f"seed={seed} chunk={CPU_PREFILL_CHUNKS[s]} rel_error={err:.3g}"


def test_cpu_prefill_takes_an_fp8_cache_through_the_reference():
    case, q, cu, scale = prefill_inputs(2, 1, 32, 16, torch.float32)
    k8, v8 = case.k_cache.to(torch.float8_e4m3fn), case.v_cache.to(torch.float8_e4m3fn)
    args = (q, k8, v8, cu, case.seq_lens, case.block_tables, max(n for _, n in PREFILL_CHUNKS), scale)
    expected = reference.paged_attention_prefill(*args, k_scale=0.5, v_scale=2.0)
    assert torch.equal(cpu.paged_attention_prefill(*args, k_scale=0.5, v_scale=2.0), expected)


def test_triton_decode_allocates_its_output_and_rejects_bad_gqa():
    seed = fresh_seed()
    case, q, scale = decode_inputs(2, 1, 16, 8, torch.float32)
    out = triton_attention.paged_attention_decode(q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
                                                  scale)
    expected = reference.paged_attention_decode(q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
                                                scale)
    assert rel_error(out, expected) < TOLERANCE[torch.float32], f"seed={seed}"
    with pytest.raises(ValueError, match="multiple of KV heads"):
        triton_attention.paged_attention_decode(q[:, :1].expand(-1, 3, -1), case.k_cache, case.v_cache,
                                                case.block_tables, case.seq_lens, scale)


def test_decode_split_heuristic_fills_the_gpu_without_tiny_splits():
    h100 = 132
    assert triton_attention.decode_num_splits(1, 8, 8192, h100) == 32  # one sequence: as many splits as allowed
    assert triton_attention.decode_num_splits(1, 8, 512, h100) == 2  # ... but none under 256 keys
    assert triton_attention.decode_num_splits(32, 8, 4096, h100) == 2  # 256 programs: just short of two per SM
    assert triton_attention.decode_num_splits(256, 8, 8192, h100) == 1  # the batch alone fills the GPU
    assert triton_attention.decode_num_splits(4, 8, 100, 0) == 1  # CPU / interpreter: no split
