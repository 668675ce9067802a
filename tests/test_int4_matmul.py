"""lmport's W4A8 int4 kernel (lmport.kernels.cpu_int4): int4 codes times activations rounded to int8 per 32 channels.

Checked against the same arithmetic written in PyTorch (the activations rounded as the kernel rounds them, then exact
sums), against the W4A16 matmul it approximates, and for where int4 weights take its layout: bf16 models on a CPU
with AVX-512 VNNI under the "auto" kernel backend; float32 models and the "torch" backend keep torch's kernel.
"""

from __future__ import annotations

import pytest
import torch

from lmport import kernels
from lmport.engine.quantization import Int4Weight, pack_int4, uses_int4_matmul
from lmport.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.int4_matmul_supported(),
                                reason="this CPU (or its compiler target) has no AVX-512 VNNI")


def random_codes(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scales = torch.rand(n, k // 32, generator=gen) * 0.1 + 0.01
    offsets = torch.randn(n, k // 32, generator=gen) * 0.5
    return codes, scales, offsets


def w4a8_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic: each 32-channel block of x rounded to int8 in float32 as the kernel rounds it
    (x * (127 / max |x|), ties to even), integer dot products with the codes, then the scales and the offsets (which
    meet the exact sums of x) in float64."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    # a tensor divided, not `127 / amax` (torch computes that as amax.reciprocal() * 127, rounded twice)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    x_codes = torch.round(blocks * inverse).double()
    dots = torch.einsum("mbj,nbj->mnb", x_codes, codes.double().reshape(-1, k // 32, 32))
    y = (dots * (amax / 127).double().squeeze(-1)[:, None, :] * scales.double()[None]).sum(-1)
    return y + blocks.double().sum(-1) @ offsets.double().T


@pytest.mark.parametrize(("m", "n", "k"), [(1, 8, 64), (3, 12, 128), (4, 16, 192), (5, 8, 64), (9, 20, 576)])
def test_int4_matmul_is_its_arithmetic_written_out(m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    codes, scales, offsets = random_codes(n, k, gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    y = cpu.int4_matmul(x, *pack_int4(codes, scales, offsets))
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    expected = w4a8_reference(x, codes, scales, offsets)
    # the kernel sums in fp32 and rounds its result to bf16 (relative 2^-8)
    assert ((y.double() - expected).abs() <= expected.abs() / 256 + 1e-4 * expected.abs().max()).all()


def test_int4_matmul_approximates_the_w4a16_matmul_and_takes_a_zero_row():
    gen = torch.Generator().manual_seed(7)
    codes, scales, offsets = random_codes(64, 576, gen)
    x = torch.randn(6, 576, generator=gen).to(torch.bfloat16)
    x[2] = 0
    y = cpu.int4_matmul(x, *pack_int4(codes, scales, offsets)).double()
    dense = codes.double() * scales.double().repeat_interleave(32, 1) + offsets.double().repeat_interleave(32, 1)
    exact = x.double() @ dense.T
    assert torch.equal(y[2], torch.zeros(64, dtype=torch.float64))
    assert (y - exact).norm() / exact.norm() < 1e-2  # what rounding x to int8 per 32 channels costs


def test_int4_matmul_names_a_wrong_layout():
    gen = torch.Generator().manual_seed(1)
    packed, scales, offsets = pack_int4(*random_codes(8, 128, gen))
    with pytest.raises(RuntimeError, match="K = 64"):
        cpu.int4_matmul(torch.zeros(1, 64, dtype=torch.bfloat16), packed, scales, offsets)
    with pytest.raises(RuntimeError, match="contiguous bf16"):
        cpu.int4_matmul(torch.zeros(1, 128), packed, scales, offsets)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_bf16_int4_weights_take_the_w4a8_layout_and_multiply_like_the_reference(group_size):
    gen = torch.Generator().manual_seed(group_size)
    n, k = 24, 256
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scales = torch.rand(n, k // group_size, generator=gen) * 0.1 + 0.01
    offsets = torch.randn(n, k // group_size, generator=gen)
    weight = Int4Weight.from_codes(codes, scales, offsets, group_size, torch.bfloat16)
    assert weight.offsets is not None
    x = torch.randn(2, 3, k, generator=gen).to(torch.bfloat16)
    y = weight.matmul(x)
    assert y.shape == (2, 3, n)
    expected = w4a8_reference(x.reshape(6, k), codes, scales.repeat_interleave(group_size // 32, 1),
                              offsets.repeat_interleave(group_size // 32, 1))
    assert ((y.reshape(6, n).double() - expected).abs() <= expected.abs() / 256 + 1e-4 * expected.abs().max()).all()


def test_float32_models_the_torch_backend_and_odd_shapes_keep_torchs_kernel():
    assert uses_int4_matmul(960, 576, 32, torch.bfloat16)
    assert not uses_int4_matmul(960, 576, 32, torch.float32)  # float32 activations are not rounded
    assert not uses_int4_matmul(960, 96, 32, torch.bfloat16)  # K not a multiple of 64
    assert not uses_int4_matmul(962, 576, 32, torch.bfloat16)  # N not a multiple of 4
    with kernels.use_backend("torch"):
        assert not uses_int4_matmul(960, 576, 32, torch.bfloat16)
        weight = Int4Weight.quantize(torch.randn(16, 64).to(torch.bfloat16), 32)
    assert weight.offsets is None and weight.scales.shape == (2, 16, 2)
