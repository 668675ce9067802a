"""lmport's integer kernels (lmport.kernels.cpu_vnni): int4 (W4A8) and int8 (W8A8) weight codes times activations
rounded to int8 per 32 channels.

Checked against the same arithmetic written in PyTorch (the activations rounded as the kernel rounds them; for int4,
exact sums for the offsets), against the W4A16 / W8A16 matmuls they approximate, and for where weights take their
layouts: bf16 models on a CPU with AVX-512 VNNI under the "auto" kernel backend; float32 models and the "torch"
backend keep torch's kernels.
"""

from __future__ import annotations

import pytest
import torch

from lmport import kernels
from lmport.engine.quantization import Int4Weight, Int8Weight, pack_int4, pack_int8, uses_vnni_matmul
from lmport.kernels import cpu

# a build that failed is a failure (every test then raises), not a skip: only a CPU without VNNI skips
pytestmark = pytest.mark.skipif(cpu.available() and not cpu.vnni_matmul_supported(),
                                reason="this CPU (or its compiler target) has no AVX-512 VNNI")


def fp16_valued(values: torch.Tensor) -> torch.Tensor:
    """The kernels keep block scales and offsets in fp16 (as GGUF does): test values they hold exactly."""
    return values.half().float()


def random_codes(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scales = fp16_valued(torch.rand(n, k // 32, generator=gen) * 0.1 + 0.01)
    offsets = fp16_valued(torch.randn(n, k // 32, generator=gen) * 0.5)
    return codes, scales, offsets


def rounded_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each 32-channel block of x rounded to int8 in float32 as the kernels round it (x * (127 / max |x|), ties to
    even): codes [M, K/32, 32] and scales [M, K/32], in float64."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    # a tensor divided, not `127 / amax` (torch computes that as amax.reciprocal() * 127, rounded twice)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    return torch.round(blocks * inverse).double(), (amax / 127).double().squeeze(-1)


def blocked_dot(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """sum over 32-channel blocks of (rounded x . codes) * x's scale * the weight's scale, in float64."""
    k = x.shape[1]
    x_codes, x_scales = rounded_activations(x)
    dots = torch.einsum("mbj,nbj->mnb", x_codes, codes.double().reshape(-1, k // 32, 32))
    return (dots * x_scales[:, None, :] * scales.double()[None]).sum(-1)


def w4a8_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The int4 kernel's arithmetic: the blocked integer dot products, then the offsets, which meet the exact sums of
    x."""
    m, k = x.shape
    return blocked_dot(x, codes, scales) + x.double().reshape(m, k // 32, 32).sum(-1) @ offsets.double().T


def close_to_the_reference(y: torch.Tensor, expected: torch.Tensor) -> bool:
    """The kernels sum in fp32 and round their result to bf16 (relative 2^-8)."""
    return bool(((y.double() - expected).abs() <= expected.abs() / 256 + 1e-4 * expected.abs().max()).all())


@pytest.mark.parametrize(("m", "n", "k"), [(1, 8, 64), (3, 12, 128), (4, 16, 192), (5, 8, 64), (9, 20, 576)])
def test_int4_matmul_is_its_arithmetic_written_out(m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    codes, scales, offsets = random_codes(n, k, gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    y = cpu.int4_matmul(x, *pack_int4(codes, scales, offsets))
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert close_to_the_reference(y, w4a8_reference(x, codes, scales, offsets))


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
    scales = fp16_valued(torch.rand(n, k // group_size, generator=gen) * 0.1 + 0.01)
    offsets = fp16_valued(torch.randn(n, k // group_size, generator=gen))
    weight = Int4Weight.from_codes(codes, scales, offsets, group_size, torch.bfloat16)
    assert weight.offsets is not None
    x = torch.randn(2, 3, k, generator=gen).to(torch.bfloat16)
    y = weight.matmul(x)
    assert y.shape == (2, 3, n)
    expected = w4a8_reference(x.reshape(6, k), codes, scales.repeat_interleave(group_size // 32, 1),
                              offsets.repeat_interleave(group_size // 32, 1))
    assert close_to_the_reference(y.reshape(6, n), expected)


def test_float32_models_the_torch_backend_and_odd_shapes_keep_torchs_kernels():
    assert uses_vnni_matmul(960, 576, torch.bfloat16)
    assert not uses_vnni_matmul(960, 576, torch.float32)  # float32 activations are not rounded
    assert not uses_vnni_matmul(960, 96, torch.bfloat16)  # K not a multiple of 64
    assert not uses_vnni_matmul(962, 576, torch.bfloat16)  # N not a multiple of 4
    with kernels.use_backend("torch"):
        assert not uses_vnni_matmul(960, 576, torch.bfloat16)
        int4 = Int4Weight.quantize(torch.randn(16, 64).to(torch.bfloat16), 32)
        int8 = Int8Weight.quantize(torch.randn(16, 64).to(torch.bfloat16))
    assert int4.offsets is None and int4.scales.shape == (2, 16, 2)
    assert not int8.blocked and int8.weight.shape == (16, 64) and int8.scales.shape == (16,)


def random_int8(n: int, k: int, gen: torch.Generator, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales [N, K/32], or [N, 1] with `per_row`."""
    codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    return codes, fp16_valued(torch.rand(n, 1 if per_row else k // 32, generator=gen) * 0.01 + 0.001)


@pytest.mark.parametrize("per_row", [False, True], ids=["block scales", "row scales"])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 8, 64), (3, 12, 128), (4, 16, 192), (5, 8, 64), (9, 20, 576)])
def test_int8_matmul_is_its_arithmetic_written_out(m, n, k, per_row):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    codes, scales = random_int8(n, k, gen, per_row)
    codes[0, :32] = -127  # the extremes: the +128 bias and its correction must cancel exactly
    codes[1, 32:64] = 127
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    y = cpu.int8_matmul(x, *pack_int8(codes, scales))
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert close_to_the_reference(y, blocked_dot(x, codes, scales.expand(n, k // 32)))


def test_int8_matmul_approximates_the_w8a16_matmul_and_takes_a_zero_row():
    gen = torch.Generator().manual_seed(8)
    codes, scales = random_int8(64, 576, gen)
    x = torch.randn(6, 576, generator=gen).to(torch.bfloat16)
    x[2] = 0
    y = cpu.int8_matmul(x, *pack_int8(codes, scales)).double()
    exact = x.double() @ (codes.double() * scales.double().repeat_interleave(32, 1)).T
    assert torch.equal(y[2], torch.zeros(64, dtype=torch.float64))
    assert (y - exact).norm() / exact.norm() < 1e-2  # what rounding x to int8 per 32 channels costs


def test_int8_matmul_names_a_wrong_layout():
    gen = torch.Generator().manual_seed(2)
    packed, scales = pack_int8(*random_int8(8, 128, gen))
    with pytest.raises(RuntimeError, match=r"64\] for x's K = 64"):
        cpu.int8_matmul(torch.zeros(1, 64, dtype=torch.bfloat16), packed, scales)
    with pytest.raises(RuntimeError, match="contiguous bf16"):
        cpu.int8_matmul(torch.zeros(1, 128), packed, scales)
    with pytest.raises(RuntimeError, match=r"32\] for x's K"):  # int4's layout is not int8's
        cpu.int4_matmul(torch.zeros(1, 128, dtype=torch.bfloat16), packed, scales, torch.zeros(2, 4, 4))
    with pytest.raises(RuntimeError, match=r"float \[N\] \(one per row\)"):
        cpu.int8_matmul(torch.zeros(1, 128, dtype=torch.bfloat16), packed, torch.ones(7))


def test_bf16_int8_weights_take_the_w8a8_layout_per_channel_or_per_block():
    gen = torch.Generator().manual_seed(3)
    n, k = 24, 256
    weight = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    per_channel = Int8Weight.quantize(weight)
    assert per_channel.blocked and per_channel.scales.shape == (n,)  # applied once a row
    scales = weight.float().abs().amax(1) / 127
    codes = torch.round(weight.float() / scales[:, None]).to(torch.int8)
    torch.testing.assert_close(per_channel.dequantize(), codes.float() * scales[:, None], rtol=0, atol=0)
    x = torch.randn(2, 3, k, generator=gen).to(torch.bfloat16)
    y = per_channel.matmul(x)
    assert y.shape == (2, 3, n)
    expected = blocked_dot(x.reshape(6, k), codes, scales[:, None].expand(n, k // 32))
    assert close_to_the_reference(y.reshape(6, n), expected)
    codes, block_scales = random_int8(n, k, gen)  # a GGUF's Q8_0 blocks are kept as they are
    blocked = Int8Weight.from_codes(codes, block_scales, torch.bfloat16)
    torch.testing.assert_close(blocked.dequantize(), codes.float() * block_scales.repeat_interleave(32, 1),
                               rtol=0, atol=0)


def test_float32_int8_weights_with_block_scales_are_requantized_per_channel_for_torchs_kernel():
    gen = torch.Generator().manual_seed(4)
    codes, block_scales = random_int8(16, 128, gen)
    weight = Int8Weight.from_codes(codes, block_scales, torch.float32)
    assert not weight.blocked and weight.scales.shape == (16,)
    values = codes.float() * block_scales.repeat_interleave(32, 1)
    assert (weight.dequantize() - values).abs().max() <= values.abs().amax(1).max() / 254 + 1e-6
