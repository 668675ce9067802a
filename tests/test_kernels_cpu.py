"""The compiled CPU kernels (lmport.kernels.cpu) against the PyTorch reference.

Decode attention: the kernel reads a cache whose unused slots (padding table entries, the tail of each last block,
blocks of no sequence) are NaN, so a single read past a sequence's keys fails the comparison; the reference gets the
same keys in a cache with zeros there (SDPA would turn masked NaN into NaN). rms_norm, silu_and_mul and
rotary_embedding round where the reference rounds, so they must match it to fp32 summation order (and exp's last bit),
and within one ulp of bf16/fp16 (on a handful of elements at most). The build itself is tested too: CI must run the
fast path, not the fallback.
"""

from __future__ import annotations

import logging
import random
import subprocess
import sys

import pytest
import torch

from lmport import kernels
from lmport.kernels import cpu, reference
from tests.kernel_helpers import fresh_seed, make_paged_case, rope_cache

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# On max |actual - expected| / max |expected| (max_rel), not the norm ratio that kernel_helpers.TOLERANCE bounds.
MAX_REL_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
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
             fn=cpu.paged_attention_decode):
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
    assert cpu.available(), "the CPU C++ extension did not build (see the lmport warning)"


def test_extension_is_built_and_used_by_auto_dispatch(monkeypatch):
    module = cpu.load()
    assert module is not None and all(hasattr(module, name) for name in cpu.FUNCTIONS)
    assert set(cpu.FUNCTIONS) == {"paged_attention_decode", "paged_attention_prefill", "rms_norm", "silu_and_mul",
                                  "rotary_embedding", "int4_matmul", "int8_matmul", "vnni_matmul_supported"}
    assert not cpu._failed
    calls = []
    def recording(*args):  # the extension takes window 0 / soft_cap 0.0 for "off"; the reference None
        calls.append(args)
        return reference.paged_attention_decode(*args[:6], args[6] or None, args[7] or None)

    monkeypatch.setattr(module, "paged_attention_decode", recording)
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
    prefills = []
    monkeypatch.setattr(module, "paged_attention_prefill", lambda *args: prefills.append(args) or args[0].clone())
    case = make_paged_case([5], 16, 1, 32, torch.float32)
    q, cu = torch.randn(5, 1, 32), torch.tensor([0, 5], dtype=torch.int32)
    with kernels.use_backend("auto"):
        kernels.paged_attention_prefill(q, case.k_cache, case.v_cache, cu, case.seq_lens, case.block_tables, 5, 0.1)
    with kernels.use_backend("torch"):
        kernels.paged_attention_prefill(q, case.k_cache, case.v_cache, cu, case.seq_lens, case.block_tables, 5, 0.1)
    assert len(prefills) == (1 if kernels.get_backend() == "auto" else 0), "prefill: auto reaches the kernel, torch not"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_kv_heads,group,head_dim,block_size", HEAD_CONFIGS)
@pytest.mark.parametrize("batch", [1, 37])
def test_matches_reference(batch, num_kv_heads, group, head_dim, block_size, dtype):
    seed, actual, expected = run_case(batch, num_kv_heads, group, head_dim, block_size, dtype)
    assert actual.dtype == dtype and actual.shape == expected.shape
    err = max_rel(actual, expected)
    assert err < MAX_REL_TOLERANCE[dtype], f"max rel error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window,soft_cap", [(1, None), (5, None), (16, None), (35, 3.0), (None, 2.0), (1000, 1.5)])
@pytest.mark.parametrize("num_kv_heads,group,head_dim,block_size", [(2, 3, 64, 8), (1, 1, 48, 16)])
def test_sliding_window_and_soft_cap_match_reference(window, soft_cap, num_kv_heads, group, head_dim, block_size,
                                                      dtype):
    """Windows of one key, unaligned, one block, several blocks and wider than the context; soft caps that bite.
    Blocks wholly before a sequence's window are NaN in the kernel's cache and -1 in its tables (freed): it must
    skip them."""
    seed = fresh_seed()
    random.seed(seed)
    case = make_paged_case(seq_lens_for(12, block_size), block_size, num_kv_heads, head_dim, dtype)
    first_keys = [max(0, n - (window or n)) for n in case.seq_lens.tolist()]
    poisoned = case.with_unused(float("nan")).with_blocks_before(first_keys, float("nan"))
    q = (torch.randn(12, num_kv_heads * group, head_dim) * 3).to(dtype)  # large scores, so the cap matters
    scale = head_dim ** -0.5
    expected = reference.paged_attention_decode(q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
                                                scale, sliding_window=window, soft_cap=soft_cap)
    actual = cpu.paged_attention_decode(q, poisoned.k_cache, poisoned.v_cache, poisoned.block_tables, case.seq_lens,
                                        scale, sliding_window=window, soft_cap=soft_cap)
    err = max_rel(actual, expected)
    assert err < MAX_REL_TOLERANCE[dtype], f"max rel error {err:.2e} (seed {seed})"
    if window is not None and window < 1000:  # the window really changes the result
        full = reference.paged_attention_decode(q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
                                                scale, soft_cap=soft_cap)
        assert max_rel(full, expected) > 1e-2


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
    actual = cpu.paged_attention_decode(q, k_view, v_view, case.block_tables, case.seq_lens, scale)
    assert max_rel(actual, expected) < 1e-2, f"seed {seed}"


def test_thread_count_does_not_change_results():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        seed = fresh_seed()
        case = make_paged_case(seq_lens_for(37, 16), 16, 3, 64, torch.float32)
        q = torch.randn(37, 9, 64)
        one = cpu.paged_attention_decode(q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
                                                   0.125)
        torch.set_num_threads(max(2, threads))
        many = cpu.paged_attention_decode(q, case.k_cache, case.v_cache, case.block_tables,
                                                    case.seq_lens, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many), f"seed {seed}"


def test_failed_build_warns_once_and_falls_back(monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load_inline", broken)
    monkeypatch.setattr(cpu, "_module", None)
    monkeypatch.setattr(cpu, "_failed", False)
    with caplog.at_level(logging.WARNING, logger="lmport"):
        for _ in range(3):
            seed, actual, expected = run_case(3, 1, 3, 32, 8, torch.float32,
                                              fn=lambda q, k, v, *rest: cpu.paged_attention_decode(
                                                  q, *_zero_filled(k, v), *rest))
            torch.testing.assert_close(actual, expected, msg=f"seed {seed}")
    warnings = [r for r in caplog.records if r.name == "lmport" and "could not be built" in r.getMessage()]
    assert len(warnings) == 1
    assert not cpu.available()


LOAD_IN_A_FRESH_PROCESS = "from lmport.kernels import cpu; assert cpu.available()"


def test_a_load_killed_mid_way_does_not_block_later_processes():
    """torch's lock file, left behind by a process SIGKILLed inside load_inline, and an flock holder killed the same
    way: the next process still loads the extension (it used to wait forever, hanging every worker start)."""
    directory = cpu.build_directory()
    assert cpu.available() and (directory / f"{directory.name}.so").exists()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
        "open(sys.argv[2], 'x').close(); print('held', flush=True); time.sleep(600)"),
        str(directory / "lmport-build.lock"), str(directory / "lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.kill()
        holder.wait(timeout=10)
        assert (directory / "lock").exists()
        subprocess.run([sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS], check=True, timeout=120)
        assert not (directory / "lock").exists()
    finally:
        holder.kill()
        (directory / "lock").unlink(missing_ok=True)


def test_build_flags_survive_a_load():
    """load_inline appends to the flag lists it is given: the build key must not change after a load."""
    name = cpu._build_name()
    assert cpu.available()
    assert cpu._build_name() == name == cpu.build_directory().name


def _zero_filled(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference fallback can't take NaN-poisoned slots (SDPA spreads masked NaN): zero them for that test."""
    return k.nan_to_num(0.0), v.nan_to_num(0.0)


# ---- rms_norm, silu_and_mul, rotary_embedding

ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}  # 2^-p, p = explicit mantissa bits


def check_elementwise(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """fp32: max error <= 1e-6 of the largest output. bf16/fp16: at most a few elements (<= 0.1 %, at least 2)
    differ at all, each by at most 2^(1-p) of its magnitude (p = mantissa bits; two ulps or more): one ulp of the
    last rounding, or a one-ulp flip of an intermediate rounding (the normalised row, silu(gate)) scaled by the
    multiply that follows, which can be two ulps of a smaller output."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), what
    diff = (a - e).abs()
    if expected.dtype == torch.float32:
        assert diff.max() <= 1e-6 * e.abs().max().clamp_min(1e-30), f"{what}: max diff {diff.max():.3e}"
        return
    ulp = 2 * ULP[expected.dtype] * torch.maximum(e.abs(), a.abs()).clamp_min(torch.finfo(expected.dtype).tiny)
    assert (diff <= ulp).all(), f"{what}: max diff {diff.max():.3e} beyond rounding"
    differing = int((diff > 0).sum())
    assert differing <= max(2, expected.numel() // 1000), f"{what}: {differing} of {expected.numel()} differ"


@pytest.fixture
def module_calls(monkeypatch):
    """Counts the calls that reach the compiled module (so a silent fallback to the reference fails the test)."""
    module = cpu.load()
    calls = []
    for name in ("rms_norm", "silu_and_mul", "rotary_embedding"):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, _f=original, _n=name: calls.append(_n) or _f(*args))
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [576, 96, 33])
@pytest.mark.parametrize("rows", [1, 37])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_matches_reference(rows, hidden, dtype, with_residual, module_calls):
    seed = fresh_seed()
    x = (torch.randn(rows, hidden) * 3).to(dtype)
    weight = (torch.rand(hidden) + 0.5).to(dtype)
    residual = torch.randn(rows, hidden).to(dtype) if with_residual else None
    expected = reference.rms_norm(x, weight, 1e-6, residual)
    actual = cpu.rms_norm(x, weight, 1e-6, residual)
    assert module_calls == ["rms_norm"]
    if with_residual:
        assert torch.equal(actual[1], expected[1]), f"residual sum (seed {seed})"
        actual, expected = actual[0], expected[0]
    check_elementwise(actual, expected, f"rms_norm seed {seed}")


def test_rms_norm_strided_rows(module_calls):
    """Rows that are views of wider tensors (row stride > hidden)."""
    seed = fresh_seed()
    wide = torch.randn(37, 700).to(torch.bfloat16)
    wide_res = torch.randn(37, 650).to(torch.bfloat16)
    x, residual = wide[:, 5:581], wide_res[:, 7:583]
    weight = torch.rand(576).to(torch.bfloat16)
    out, r = cpu.rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_r = reference.rms_norm(x, weight, 1e-5, residual)
    assert module_calls == ["rms_norm"]
    assert torch.equal(r, ref_r), f"seed {seed}"
    check_elementwise(out, ref_out, f"seed {seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inter", [1536, 96, 33])
@pytest.mark.parametrize("rows", [1, 37])
def test_silu_and_mul_matches_reference(rows, inter, dtype, module_calls):
    seed = fresh_seed()
    x = (torch.randn(rows, 2 * inter) * 4).to(dtype)
    x[0, :4] = torch.tensor([0.0, -0.0, 30.0, -30.0]).to(dtype) if inter >= 4 else x[0, :4]
    check_elementwise(cpu.silu_and_mul(x), reference.silu_and_mul(x), f"silu_and_mul seed {seed}")
    assert module_calls == ["silu_and_mul"]
    strided = torch.randn(rows, 2 * inter + 8).to(dtype)[:, 3:3 + 2 * inter]  # a row view of a wider tensor
    check_elementwise(cpu.silu_and_mul(strided), reference.silu_and_mul(strided), f"strided seed {seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (3, 1, 96), (2, 1, 34)])
@pytest.mark.parametrize("rows", [1, 37])
def test_rotary_embedding_matches_reference_on_qkv_views(rows, q_heads, kv_heads, head_dim, dtype, module_calls):
    """q and k as the model passes them: split views of one fused qkv projection (row stride > width)."""
    seed = fresh_seed()
    cache = rope_cache(4096, head_dim)
    positions = torch.randint(0, 4096, (rows,))
    positions[0] = 0
    qkv = (torch.randn(rows, (q_heads + 2 * kv_heads) * head_dim) * 2).to(dtype)
    q, k, _ = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    before = qkv.clone()
    expected = reference.rotary_embedding(positions, q, k, cache, head_dim)
    actual = cpu.rotary_embedding(positions, q, k, cache, head_dim)
    assert module_calls == ["rotary_embedding"]
    for got, want, name in zip(actual, expected, "qk"):
        check_elementwise(got, want, f"{name} seed {seed}")
    assert torch.equal(qkv, before), "the inputs must not be modified"
    # int32 positions and contiguous q/k give the same answer
    again = cpu.rotary_embedding(positions.to(torch.int32), q.contiguous(), k.contiguous(), cache, head_dim)
    assert all(torch.equal(a, b) for a, b in zip(again, actual))


def test_elementwise_out_of_range_position_raises():
    q, k = torch.randn(2, 64), torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="out of the rotary cache"):
        cpu.rotary_embedding(torch.tensor([0, 16]), q, k, rope_cache(16, 64), 64)


def test_elementwise_auto_dispatch_reaches_the_kernels(module_calls):
    x = torch.randn(5, 64)
    weight = torch.rand(64)
    positions = torch.arange(5)
    before = kernels._backend
    try:
        kernels.set_backend("auto")
        if kernels.get_backend() == "auto":  # LMPORT_KERNEL_BACKEND may force another backend in this process
            kernels.rms_norm(x, weight, 1e-6)
            kernels.rms_norm(x, weight, 1e-6, x)
            kernels.silu_and_mul(x)
            kernels.rotary_embedding(positions, x, x[:, :32], rope_cache(8, 32), 32)
            assert module_calls == ["rms_norm", "rms_norm", "silu_and_mul", "rotary_embedding"]
        module_calls.clear()
        kernels.set_backend("torch")
        kernels.rms_norm(x, weight, 1e-6, x)
        kernels.silu_and_mul(x)
        kernels.rotary_embedding(positions, x, x[:, :32], rope_cache(8, 32), 32)
        assert not module_calls, "the 'torch' backend must run the pure reference"
    finally:
        kernels.set_backend(before)


def test_elementwise_fall_back_after_a_failed_build(monkeypatch):
    monkeypatch.setattr(cpu, "_module", None)
    monkeypatch.setattr(cpu, "_failed", True)
    x, weight = torch.randn(3, 32), torch.rand(32)
    torch.testing.assert_close(cpu.rms_norm(x, weight, 1e-6, x), reference.rms_norm(x, weight, 1e-6, x))
    torch.testing.assert_close(cpu.silu_and_mul(x), reference.silu_and_mul(x))
    cache = rope_cache(8, 16)
    torch.testing.assert_close(cpu.rotary_embedding(torch.arange(3), x, x, cache, 16),
                               reference.rotary_embedding(torch.arange(3), x, x, cache, 16))


@pytest.mark.parametrize("cold", [False, True])
def test_micro_benchmark_runs_warm_and_cold(cold):
    args = [sys.executable, "-m", "lmport.kernels.cpu", "--batch", "2", "--context", "40", "--rounds", "1"]
    run = subprocess.run(args + (["--cold"] if cold else []), capture_output=True, text=True, timeout=300, check=True)
    assert "speed-up" in run.stdout and ("(cold caches)" in run.stdout) == cold
