"""Triton SiLU-and-multiply: out = silu(x[:, :I]) * x[:, I:], computed in fp32 and rounded once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmport.kernels.triton_common import check_last_dim_contiguous

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inner, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inner
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inner + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, 2I] -> [N, I]; `out` may be preallocated."""
    num_rows, width = x.shape
    if width % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension, got {width}")
    check_last_dim_contiguous("x", x)
    inner = width // 2
    out = torch.empty((num_rows, inner), dtype=x.dtype, device=x.device) if out is None else out
    if num_rows:
        _silu_and_mul_kernel[(num_rows, triton.cdiv(inner, BLOCK))](
            x, out, inner, x.stride(0), out.stride(0), BLOCK=BLOCK, num_warps=4)
    return out
