"""KV-cache store, RMSNorm (+ residual), rotary embedding and SiLU-and-mul: reference against naive float64 math,
Triton (on the GPU, else the interpreter) against the reference, with poisoned outputs."""

from __future__ import annotations

import pytest
import torch

from tests.kernel_helpers import (
    DEVICE,
    TOLERANCE,
    enable_triton_interpreter,
    fresh_seed,
    poisoned,
    rel_error,
    rope_cache,
)

enable_triton_interpreter()

from lmport.kernels import reference, triton_activation, triton_cache, triton_norm, triton_rope  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, seed: int, what: str) -> None:
    err = rel_error(actual, expected)
    assert err < TOLERANCE[dtype], f"seed={seed} {what} rel_error={err:.3g}"


# --- store_kv_cache ---

def store_inputs(dtype: torch.dtype, num_kv_heads: int = 3, head_dim: int = 24, block_size: int = 8):
    slots = torch.randperm(5 * block_size)[:9]
    slots[[2, 6]] = -1  # padding rows
    slots = slots.to(DEVICE)
    # key/value as views of a fused qkv projection (strided rows)
    qkv = torch.randn(9, 4 * num_kv_heads * head_dim).to(DEVICE, dtype)
    key = qkv[:, 2 * num_kv_heads * head_dim:3 * num_kv_heads * head_dim].view(9, num_kv_heads, head_dim)
    value = qkv[:, 3 * num_kv_heads * head_dim:].view(9, num_kv_heads, head_dim)
    cache = torch.randn(2, 5, block_size, num_kv_heads, head_dim).to(DEVICE, dtype)  # old contents must survive
    return key, value, cache, slots


def naive_store(key, value, cache, slots) -> None:
    size = cache.shape[2]
    for row, slot in enumerate(slots.tolist()):
        if slot >= 0:
            cache[0, slot // size, slot % size] = key[row]
            cache[1, slot // size, slot % size] = value[row]


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_cache_reference_and_triton_match_naive(dtype):
    seed = fresh_seed()
    key, value, cache, slots = store_inputs(dtype)
    expected = cache.clone()
    naive_store(key, value, expected, slots)
    for impl in (reference, triton_cache):
        got = cache.clone()
        impl.store_kv_cache(key, value, got[0], got[1], slots)
        assert torch.equal(got, expected), f"seed={seed} {impl.__name__} wrote the wrong slots"


# --- rms_norm ---

def naive_rms_norm(x, weight, eps):
    x = x.cpu().double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.cpu().double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [40, 96])
def test_rms_norm(dtype, hidden):
    seed = fresh_seed()
    x, residual = torch.randn(7, hidden).to(DEVICE, dtype), torch.randn(7, hidden).to(DEVICE, dtype)
    weight, eps = (torch.rand(hidden) + 0.5).to(DEVICE, dtype), 1e-6
    check(reference.rms_norm(x, weight, eps), naive_rms_norm(x, weight, eps), dtype, seed, "reference")
    ref_out, ref_sum = reference.rms_norm(x, weight, eps, residual)
    check(ref_sum, x.cpu().double() + residual.cpu().double(), dtype, seed, "reference residual")
    check(ref_out, naive_rms_norm(ref_sum, weight, eps), dtype, seed, "reference fused")

    out = poisoned(x.shape, dtype)
    triton_norm.rms_norm(x, weight, eps, out=out)
    check(out, reference.rms_norm(x, weight, eps), dtype, seed, "triton")
    out, res_out = poisoned(x.shape, dtype), poisoned(x.shape, dtype)
    triton_norm.rms_norm(x, weight, eps, residual, out=out, residual_out=res_out)
    check(out, ref_out, dtype, seed, "triton fused")
    check(res_out, ref_sum, dtype, seed, "triton residual")


def test_rms_norm_allocates_promoted_outputs():
    seed = fresh_seed()
    x = torch.randn(3, 16).to(DEVICE, torch.float16)
    weight = (torch.rand(16) + 0.5).to(DEVICE)  # an fp32 weight promotes the output, as in torch
    out = triton_norm.rms_norm(x, weight, 1e-5)
    assert out.dtype == torch.float32
    check(out, reference.rms_norm(x, weight, 1e-5), torch.float16, seed, "promoted")


# --- rotary_embedding ---

def naive_rope(positions, x, cos_sin, head_dim):
    half = head_dim // 2
    positions, x, cos_sin = positions.cpu(), x.cpu(), cos_sin.cpu()
    out = x.double().view(x.shape[0], -1, head_dim).clone()
    for row, pos in enumerate(positions.tolist()):
        cos, sin = cos_sin[pos, :half].double(), cos_sin[pos, half:].double()
        x1, x2 = out[row, :, :half].clone(), out[row, :, half:].clone()
        out[row, :, :half] = x1 * cos - x2 * sin
        out[row, :, half:] = x2 * cos + x1 * sin
    return out.flatten(1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(2, 2, 16), (6, 2, 32), (3, 1, 64)])
def test_rotary_embedding(dtype, heads):
    seed = fresh_seed()
    num_q_heads, num_kv_heads, head_dim = heads
    cos_sin = rope_cache(64, head_dim).to(DEVICE)
    positions = torch.randint(1, 64, (6,)).to(DEVICE)  # position 0 is the identity: a missed row would pass
    qkv = torch.randn(6, (num_q_heads + 2 * num_kv_heads) * head_dim).to(DEVICE, dtype)
    q, k, v = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    ref_q, ref_k = reference.rotary_embedding(positions, q.clone(), k.clone(), cos_sin, head_dim)
    check(ref_q, naive_rope(positions, q, cos_sin, head_dim), dtype, seed, "reference q")
    check(ref_k, naive_rope(positions, k, cos_sin, head_dim), dtype, seed, "reference k")

    v_before = v.clone()
    out_q, out_k = triton_rope.rotary_embedding(positions, q, k, cos_sin, head_dim)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr(), "rotation must be in place"
    check(q, ref_q, dtype, seed, "triton q")
    check(k, ref_k, dtype, seed, "triton k")
    assert torch.equal(v, v_before), f"seed={seed} rotary wrote into v"


# --- silu_and_mul ---

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inner", [24, 1030])  # 1030: two column blocks per row, the second partial
def test_silu_and_mul(dtype, inner):
    seed = fresh_seed()
    x = torch.randn(5, 2 * inner).to(DEVICE, dtype)
    gate, up = x.cpu().double().chunk(2, dim=-1)
    expected = reference.silu_and_mul(x)
    check(expected, gate / (1 + torch.exp(-gate)) * up, dtype, seed, "reference")
    out = poisoned((5, inner), dtype)
    triton_activation.silu_and_mul(x, out=out)
    check(out, expected, dtype, seed, "triton")
