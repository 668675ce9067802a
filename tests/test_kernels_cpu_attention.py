"""The compiled CPU decode-attention kernel (kernels.cpu_attention) against the PyTorch reference.

The kernel reads a cache whose unused slots (padding table entries, the tail of each last block, blocks of no sequence)
are NaN, so a single read past a sequence's keys fails the comparison; the reference gets the same keys in a cache with
zeros there (SDPA would turn masked NaN into NaN). The build itself is tested too: CI must run the fast path, not the
fallback.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

from tests.kernel_helpers import fresh_seed, make_paged_case

import kernels
from kernels import cpu_attention, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# max |actual - expected| / max |expected|
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# (num_kv_heads, GQA group, head_dim, block_size): ratios 1 and 3; head_dims with a compiled specialisation (32, 64,
# 128) and one through the generic path (48); both page sizes
HEAD_CONFIGS = [(2, 1, 32, 8), (3, 3, 64, 16), (1, 3, 128, 8), (2, 1, 128, 16), (2, 3, 48, 16), (4, 1, 64, 8)]


def seq_lens_for(batch: int, block_size: int) -> list[int]:
    """A lone token, partial last blocks, exact multiples of the page, and random lengths up to ~6 pages."""
    fixed = [1, block_size - 1, block_size, block_size + 1, 3 * block_size, 5 * block_size + 3]
    lens = fixed[:batch] + [random.randint(1, 6 * block_size) for _ in range(batch - len(fixed))]
    return lens[:batch]


def max_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def run_case(batch: int, num_kv_heads: int, group: int, head_dim: int, block_size: int, dtype: torch.dtype,
             fn=cpu_attention.paged_attention_decode):
    seed = fresh_seed()
    random.seed(seed)
    case = make_paged_case(seq_lens_for(batch, block_size), block_size, num_kv_heads, head_dim, dtype)
    poisoned = case.with_unused(float("nan"))
    q = torch.randn(batch, num_kv_heads * group, head_dim).to(dtype)
    scale = head_dim ** -0.5
    expected = reference.paged_attention_decode(q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
                                                scale)
    actual = fn(q, poisoned.k_cache, poisoned.v_cache, case.block_tables, case.seq_lens, scale)
    return seed, actual, expected


@pytest.fixture(scope="module", autouse=True)
def built():
    """Every test here checks the compiled kernel, so the build must have succeeded."""
    assert cpu_attention.available(), "the CPU attention extension did not build (see the lmport warning)"


def test_extension_is_built_and_used_by_auto_dispatch(monkeypatch):
    module = cpu_attention.load()
    assert module is not None and hasattr(module, "paged_attention_decode")
    assert not cpu_attention._failed
    calls = []
    monkeypatch.setattr(module, "paged_attention_decode",
                        lambda *args: calls.append(args) or reference.paged_attention_decode(*args))
    before = kernels._backend
    try:
        kernels.set_backend("auto")
        if kernels.get_backend() == "auto":  # LMPORT_KERNEL_BACKEND may force another backend in this process
            run_case(2, 1, 3, 64, 16, torch.float32, fn=kernels.paged_attention_decode)
            assert len(calls) == 1, "auto dispatch on CPU tensors did not reach the compiled kernel"
        calls.clear()
        kernels.set_backend("torch")
        run_case(2, 1, 3, 64, 16, torch.float32, fn=kernels.paged_attention_decode)
        assert not calls, "the 'torch' backend must run the pure reference"
    finally:
        kernels.set_backend(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_kv_heads,group,head_dim,block_size", HEAD_CONFIGS)
@pytest.mark.parametrize("batch", [1, 37])
def test_matches_reference(batch, num_kv_heads, group, head_dim, block_size, dtype):
    seed, actual, expected = run_case(batch, num_kv_heads, group, head_dim, block_size, dtype)
    assert actual.dtype == dtype and actual.shape == expected.shape
    err = max_rel(actual, expected)
    assert err < TOLERANCE[dtype], f"max rel error {err:.2e} (seed {seed})"


def test_strided_query_and_per_layer_cache_view():
    """q as a view of a fused qkv projection; the caches as one layer's slice of a [layers, ...] tensor."""
    seed = fresh_seed()
    random.seed(seed)
    num_kv_heads, group, head_dim, block_size = 3, 3, 64, 16
    case = make_paged_case(seq_lens_for(9, block_size), block_size, num_kv_heads, head_dim, torch.bfloat16)
    poisoned = case.with_unused(float("nan"))
    big_k = torch.full((2, *case.k_cache.shape), float("nan"), dtype=torch.bfloat16)
    big_v = big_k.clone()
    big_k[1], big_v[1] = poisoned.k_cache, poisoned.v_cache
    k_view, v_view = big_k.select(0, 1), big_v.select(0, 1)
    num_q_heads = num_kv_heads * group
    qkv = torch.randn(9, (num_q_heads + 2 * num_kv_heads) * head_dim).to(torch.bfloat16)
    q = qkv[:, :num_q_heads * head_dim].view(9, num_q_heads, head_dim)
    scale = head_dim ** -0.5
    expected = reference.paged_attention_decode(q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
                                                scale)
    actual = cpu_attention.paged_attention_decode(q, k_view, v_view, case.block_tables, case.seq_lens, scale)
    assert max_rel(actual, expected) < 1e-2, f"seed {seed}"


def test_thread_count_does_not_change_results():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        seed = fresh_seed()
        case = make_paged_case(seq_lens_for(37, 16), 16, 3, 64, torch.float32)
        q = torch.randn(37, 9, 64)
        one = cpu_attention.paged_attention_decode(q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
                                                   0.125)
        torch.set_num_threads(max(2, threads))
        many = cpu_attention.paged_attention_decode(q, case.k_cache, case.v_cache, case.block_tables,
                                                    case.seq_lens, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many), f"seed {seed}"


def test_failed_build_warns_once_and_falls_back(monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load_inline", broken)
    monkeypatch.setattr(cpu_attention, "_module", None)
    monkeypatch.setattr(cpu_attention, "_failed", False)
    with caplog.at_level(logging.WARNING, logger="lmport"):
        for _ in range(3):
            seed, actual, expected = run_case(3, 1, 3, 32, 8, torch.float32,
                                              fn=lambda q, k, v, *rest: cpu_attention.paged_attention_decode(
                                                  q, *_zero_filled(k, v), *rest))
            torch.testing.assert_close(actual, expected, msg=f"seed {seed}")
    warnings = [r for r in caplog.records if r.name == "lmport" and "could not be built" in r.getMessage()]
    assert len(warnings) == 1
    assert not cpu_attention.available()


def _zero_filled(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference fallback can't take NaN-poisoned slots (SDPA spreads masked NaN): zero them for that test."""
    return k.nan_to_num(0.0), v.nan_to_num(0.0)
