"""An fp8 KV cache (kv_cache_dtype="fp8" / "fp8_e5m2"): stores K / k_scale and V / v_scale saturated to the type's
range, and every attention path (reference, CPU dispatch, Triton) reads it back as entry * scale.

Reads are checked against the reference over the dequantized cache held in fp32, so the only error allowed is the
kernels' own arithmetic; the fp8 rounding itself is checked against naive attention on the original K/V with a
tolerance fp8's 3 (e4m3) or 2 (e5m2) mantissa bits meet.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernel_helpers import DEVICE, TOLERANCE, enable_triton_interpreter, fresh_seed, make_paged_case, rel_error

enable_triton_interpreter()

from lmport import kernels  # noqa: E402
from lmport.kernels import cpu, reference, triton_attention, triton_cache  # noqa: E402

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
# attention through the rounding of a one-byte float: e4m3 keeps 3 mantissa bits, e5m2 2
FP8_ATTENTION_TOLERANCE = {torch.float8_e4m3fn: 0.08, torch.float8_e5m2: 0.15}
SCALES = (0.5, 0.25)  # k_scale, v_scale: not 1, so a scale applied twice, or never, fails
DECODE_LENS = [1, 17, 45]
PREFILL_CHUNKS = [(0, 9), (16, 9), (40, 1)]


def quantized(case, cache_dtype: torch.dtype):
    """The case's caches stored as cache_dtype under SCALES, and the same entries dequantized into fp32."""
    k_scale, v_scale = SCALES
    k8 = reference.quantize_kv(case.k_cache, cache_dtype, k_scale)
    v8 = reference.quantize_kv(case.v_cache, cache_dtype, v_scale)
    return k8, v8, k8.float() * k_scale, v8.float() * v_scale


def naive(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last len(q) positions over contiguous keys, in float64."""
    q = q.cpu()
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, 1).transpose(0, 1)
    v = values.double().repeat_interleave(group, 1).transpose(0, 1)
    scores = q.double().transpose(0, 1) @ k.transpose(1, 2) * scale  # [H, n, L]
    n, length = q.shape[0], keys.shape[0]
    visible = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]
    return (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v).transpose(0, 1)


@pytest.mark.parametrize("cache_dtype", FP8)
def test_store_quantizes_saturates_and_skips_padding(cache_dtype):
    seed = fresh_seed()
    k_scale, v_scale = SCALES
    limit = torch.finfo(cache_dtype).max
    slots = torch.tensor([3, -1, 8, 0, 15, -1])
    # Triton's interpreter casts fp32 to fp8 wrongly where rounding up crosses a power of two (7.99 -> 4.0, not 8.0),
    # so on CPU its store gets values fp8 holds exactly; on CUDA it gets the reference's random ones.
    for impl, exact_inputs in ((reference, False), (triton_cache, DEVICE.type != "cuda")):
        key, value = torch.randn(6, 2, 16) * 4, torch.randn(6, 2, 16)
        if exact_inputs:
            key = reference.quantize_kv(key, cache_dtype, k_scale).float() * k_scale
            value = reference.quantize_kv(value, cache_dtype, v_scale).float() * v_scale
        key[0, 0, 0] = 1e6  # past the type's range: saturates instead of reading back as NaN / inf
        k_cache = torch.full((2, 8, 2, 16), 1.0).to(DEVICE, cache_dtype)
        v_cache = torch.full((2, 8, 2, 16), 1.0).to(DEVICE, cache_dtype)
        impl.store_kv_cache(key.to(DEVICE), value.to(DEVICE), k_cache, v_cache, slots.to(DEVICE), k_scale, v_scale)
        flat_k, flat_v = k_cache.view(-1, 2, 16).cpu(), v_cache.view(-1, 2, 16).cpu()
        for row, slot in enumerate(slots.tolist()):
            if slot < 0:
                continue
            for got, rows, scale in ((flat_k, key, k_scale), (flat_v, value, v_scale)):
                expected = (rows[row] / scale).clamp(-limit, limit).to(cache_dtype)
                assert torch.equal(got[slot].view(torch.uint8), expected.view(torch.uint8)), \
                    f"seed={seed} {impl.__name__} slot={slot}"
        assert flat_k[3, 0, 0].float() == limit, impl.__name__
        untouched = [s for s in range(16) if s not in slots.tolist()]
        assert torch.equal(flat_k[untouched].float(), torch.ones(len(untouched), 2, 16)), impl.__name__


def decode_case(cache_dtype: torch.dtype, heads: tuple[int, int, int, int]):
    num_kv_heads, group, head_dim, block_size = heads
    case = make_paged_case(DECODE_LENS, block_size, num_kv_heads, head_dim, torch.float32)
    q = torch.randn(len(DECODE_LENS), num_kv_heads * group, head_dim).to(DEVICE)
    return case, q, head_dim ** -0.5, quantized(case, cache_dtype)


@pytest.mark.parametrize("cache_dtype", FP8)
@pytest.mark.parametrize("heads", [(2, 1, 32, 16), (1, 3, 16, 8)])
def test_decode_reads_entries_times_scales_on_every_path(cache_dtype, heads):
    seed = fresh_seed()
    case, q, scale, (k8, v8, k_deq, v_deq) = decode_case(cache_dtype, heads)
    args = (case.block_tables, case.seq_lens, scale)
    expected = reference.paged_attention_decode(q, k_deq, v_deq, *args)
    from_fp8 = reference.paged_attention_decode(q, k8, v8, *args, k_scale=SCALES[0], v_scale=SCALES[1])
    assert rel_error(from_fp8, expected) < TOLERANCE[torch.float32], f"reference seed={seed}"
    assert cpu.available(), "the CPU C++ extension did not build (see the lmport warning)"
    from_kernel = cpu.load().paged_attention_decode(q, k8, v8, case.block_tables, case.seq_lens,
                                                    scale * SCALES[0], 0, 0.0) * SCALES[1]
    assert rel_error(from_kernel, expected) < TOLERANCE[torch.float32], f"C++ kernel seed={seed}"
    bf16 = cpu.paged_attention_decode(q.bfloat16(), k8, v8, *args, k_scale=SCALES[0], v_scale=SCALES[1])
    assert bf16.dtype == torch.bfloat16 and rel_error(bf16, expected) < TOLERANCE[torch.bfloat16], f"bf16 seed={seed}"
    with kernels.use_backend("auto"):  # the CPU dispatch, which folds the scales in
        dispatched = kernels.paged_attention_decode(q, k8, v8, *args, k_scale=SCALES[0], v_scale=SCALES[1])
    assert rel_error(dispatched, expected) < TOLERANCE[torch.float32], f"dispatch seed={seed}"
    for num_splits in (1, 3):
        out = triton_attention.paged_attention_decode(q, k8, v8, *args, None, None, *SCALES, num_splits=num_splits)
        assert rel_error(out, expected) < TOLERANCE[torch.float32], f"triton seed={seed} num_splits={num_splits}"
    for b, (keys, values) in enumerate(zip(case.keys, case.values)):
        err = rel_error(from_fp8[b:b + 1], naive(q[b:b + 1], keys, values, scale))
        assert err < FP8_ATTENTION_TOLERANCE[cache_dtype], f"seed={seed} seq={b} fp8 rounding rel_error={err:.3g}"


@pytest.mark.parametrize("cache_dtype", FP8)
def test_prefill_reads_entries_times_scales(cache_dtype):
    seed = fresh_seed()
    num_kv_heads, group, head_dim, block_size = 1, 3, 16, 8
    case = make_paged_case([c + n for c, n in PREFILL_CHUNKS], block_size, num_kv_heads, head_dim, torch.float32)
    cu = torch.tensor([0] + [n for _, n in PREFILL_CHUNKS], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q = torch.randn(int(cu[-1]), num_kv_heads * group, head_dim).to(DEVICE)
    cu = cu.to(DEVICE)
    k8, v8, k_deq, v_deq = quantized(case, cache_dtype)
    args = (cu, case.seq_lens, case.block_tables, max(n for _, n in PREFILL_CHUNKS), head_dim ** -0.5)
    expected = reference.paged_attention_prefill(q, k_deq, v_deq, *args)
    from_fp8 = reference.paged_attention_prefill(q, k8, v8, *args, k_scale=SCALES[0], v_scale=SCALES[1])
    assert rel_error(from_fp8, expected) < TOLERANCE[torch.float32], f"reference seed={seed}"
    out = triton_attention.paged_attention_prefill(q, k8, v8, *args, None, None, *SCALES)
    assert rel_error(out, expected) < TOLERANCE[torch.float32], f"triton seed={seed}"
    for s, (keys, values) in enumerate(zip(case.keys, case.values)):
        rows = slice(int(cu[s]), int(cu[s + 1]))
        err = rel_error(from_fp8[rows], naive(q[rows], keys, values, head_dim ** -0.5))
        assert err < FP8_ATTENTION_TOLERANCE[cache_dtype], f"seed={seed} chunk={PREFILL_CHUNKS[s]} rel_error={err:.3g}"
