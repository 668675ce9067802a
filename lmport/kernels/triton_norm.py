"""Triton RMSNorm, optionally fused with the residual add: one program per row, statistics in fp32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmport.kernels.triton_common import check_last_dim_contiguous


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, hidden, eps,
                     stride_x, stride_r, stride_o, stride_ro,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to the model dtype first, as in transformers: it is the next layer's residual.
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)).to(x.dtype)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, 0) / hidden + eps)
    # Round to the model dtype before the weight, as transformers does; the product of two such values is exact in
    # fp32, so multiplying there and rounding once equals the reference's low-precision multiply.
    normed = (x32 * rstd).to(x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
             out: torch.Tensor | None = None,
             residual_out: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x/rms(x)*w, or with residual: r = x + residual -> (rms_norm(r)*w, r). `out`/`residual_out` may be given."""
    num_rows, hidden = x.shape
    check_last_dim_contiguous("x", x)
    if out is None:
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if residual is not None:
        check_last_dim_contiguous("residual", residual)
        residual_out = torch.empty_like(x) if residual_out is None else residual_out
    if num_rows:
        block = triton.next_power_of_2(hidden)
        res, res_out = (residual, residual_out) if residual is not None else (x, out)  # placeholders, unread
        _rms_norm_kernel[(num_rows,)](
            x, res, weight, out, res_out, hidden, eps, x.stride(0), res.stride(0), out.stride(0), res_out.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return out if residual is None else (out, residual_out)
