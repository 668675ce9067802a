"""Weight-only quantization of a loaded model's Linear layers, on CPU: `quantization="int8"` or `"int4"`.

bf16 models on a CPU with AVX-512 VNNI, under the "auto" kernel backend, run lmport's integer kernels
(lmport.kernels.cpu_vnni): activations rounded to int8 per 32 channels, integer dot products with `vpdpbusd`. At
1-4 activation rows they are 1.1-1.5x torch's kernels, which widen the weights to floating point; from 8 rows int4
is 0.9-1.0x (docs/performance.md). Elsewhere, and for float32 models, whose activations are never rounded:

- int8: torch's `_weight_int8pack_mm` (activations stay in the model dtype, the weight is widened inside the
  kernel). torch 2.13's kernel reads out of bounds on strided rows and on input sizes that are not multiples of 16,
  so rows are made contiguous and such layers are refused.
- int4: the weight is packed once with `_convert_weight_to_int4pack_for_cpu` and multiplied with
  `_weight_int4pack_mm_for_cpu`, whose convention is w = (q - 8) * scale + zero.

int8 is symmetric, one scale per output channel; int4 asymmetric, one scale and zero point per group of
`quantization_group_size` (32, 64 or 128) input channels. Every Linear is quantized, lm_head included (a tied
embedding keeps its full-precision table); MoE experts, which are stacked tensors rather than Linears, stay in the
model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmport import kernels
from lmport.engine.errors import InvalidParams
from lmport.kernels import cpu as cpu_kernels

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
_INT4_INNER_K_TILES = 2  # what _convert_weight_to_int4pack_for_cpu packs for; K must divide by 16 * this


@dataclass(slots=True)
class Int8Weight:
    """Symmetric int8 codes (w = code * scale) in one of two kernels' layouts, chosen by `from_codes`.

    - blocked False: torch's `_weight_int8pack_mm`; `weight` int8 [N, K], `scales` [N] in the activation dtype.
    - blocked True: lmport's W8A8 kernel (lmport.kernels.cpu_vnni), for bf16 activations on CPUs with AVX-512 VNNI;
      `weight` and `scales` are `pack_int8`'s two tensors (float scales [N], or float16 per 32 channels).
    """
    weight: torch.Tensor
    scales: torch.Tensor
    out_features: int
    blocked: bool = False

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.blocked:
            y = cpu_kernels.int8_matmul(flat, self.weight, self.scales)
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.weight, self.scales)
        return y.reshape(*x.shape[:-1], self.out_features)

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype | None = None) -> Int8Weight:
        """Per output channel: scale = max |w| / 127. `dtype`: the activations' (default: the weight's)."""
        w = weight.float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.clamp(torch.round(w / scales[:, None]), -127, 127).to(torch.int8)
        return cls.from_codes(q, scales[:, None], dtype or weight.dtype)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> Int8Weight:
        """Codes int8 [N, K] with w = code * scale, scales [N, 1] (per channel) or [N, K / 32] (a GGUF's Q8_0
        blocks). torch's kernel takes only the former: blocks are re-quantized per channel for it."""
        n, k = codes.shape
        if uses_vnni_matmul(n, k, dtype):
            return cls(*pack_int8(codes, scales), n, blocked=True)
        if scales.shape[1] != 1:
            return cls.quantize(codes.float() * scales.float().repeat_interleave(32, 1), dtype)
        return cls(codes.contiguous(), scales.reshape(n).to(dtype), n)

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] in float32."""
        if not self.blocked:
            return self.weight.float() * self.scales.float()[:, None]
        tiles, chunks = self.weight.shape[:2]
        codes = (self.weight.permute(0, 2, 1, 3).reshape(tiles * 4, chunks * 64).to(torch.int16) - 128).float()
        if self.scales.dim() == 1:
            return codes * self.scales[:, None]
        return codes * self.scales.permute(0, 2, 1, 3).reshape(tiles * 4, chunks * 2).float().repeat_interleave(32, 1)


@dataclass(slots=True)
class Int4Weight:
    """Group-wise int4 codes in one of two kernels' layouts, chosen by `from_codes`.

    - offsets None: torch's `_weight_int4pack_mm_for_cpu`; `packed` is `_convert_weight_to_int4pack_for_cpu`'s
      layout and `scales` its scales_and_zeros [K / group_size, N, 2] in the activation dtype.
    - offsets set: lmport's W4A8 kernel (lmport.kernels.cpu_vnni), for bf16 activations on CPUs with AVX-512 VNNI;
      `packed`, `scales` and `offsets` are `pack_int4`'s three tensors.
    """
    packed: torch.Tensor
    group_size: int
    scales: torch.Tensor
    out_features: int
    offsets: torch.Tensor | None = None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.offsets is not None:
            y = cpu_kernels.int4_matmul(flat, self.packed, self.scales, self.offsets)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales)
        return y.reshape(*x.shape[:-1], self.out_features)

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int) -> Int4Weight:
        n, k = weight.shape
        groups = weight.float().reshape(n, k // group_size, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scales = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.clamp(torch.round((groups - low[..., None]) / scales[..., None]), 0, 15).to(torch.int32)
        return cls.from_codes(q.reshape(n, k), scales, low, group_size, weight.dtype)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
                   dtype: torch.dtype) -> Int4Weight:
        """Codes [N, K] in 0..15 with w = code * scale + offset per group ([N, K / group_size] each)."""
        n, k = codes.shape
        if group_size % 32 == 0 and uses_vnni_matmul(n, k, dtype):
            repeat = group_size // 32
            packed, block_scales, block_offsets = pack_int4(codes, scales.float().repeat_interleave(repeat, 1),
                                                            offsets.float().repeat_interleave(repeat, 1))
            return cls(packed, group_size, block_scales, n, block_offsets)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), _INT4_INNER_K_TILES)
        zeros = offsets.float() + 8 * scales.float()  # the kernel computes (q - 8) * scale + zero
        scales_and_zeros = torch.stack([scales.float(), zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)
        return cls(packed, group_size, scales_and_zeros, n)


def uses_vnni_matmul(out_features: int, in_features: int, dtype: torch.dtype) -> bool:
    """Whether an int8 or int4 Linear of this shape runs lmport's integer kernels (lmport.kernels.cpu_vnni): bf16
    activations, the kernel backend "auto" (in force while the model loads), a CPU with AVX-512 VNNI, and shapes
    their tiles divide. float32 models keep torch's kernels, whose activations are not rounded."""
    return (dtype == torch.bfloat16 and out_features % 4 == 0 and in_features % 64 == 0
            and kernels.get_backend() == "auto" and cpu_kernels.vnni_matmul_supported())


def tile_block_scales(block_scales: torch.Tensor) -> torch.Tensor:
    """Per-32-channel scales [N, K / 32] -> float16 [N/4, K/64, 4, 2]: each tile's and 64 channels' together."""
    n, blocks = block_scales.shape
    return block_scales.to(torch.float16).reshape(n // 4, 4, blocks // 2, 2).permute(0, 2, 1, 3).contiguous()


def pack_int4(codes: torch.Tensor, block_scales: torch.Tensor,
              block_offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [N, K] in 0..15 and per-32-channel scales / offsets [N, K / 32] -> lmport.kernels.cpu_vnni's layout:
    codes uint8 [N/4, K/64, 4, 32] (channel j of a 64-channel chunk in byte j's low nibble, j + 32 in its high one),
    scales float16 [N/4, K/64, 4, 2], offsets float16 [N/4, K/32, 4]."""
    n, k = codes.shape
    chunked = codes.to(torch.uint8).reshape(n // 4, 4, k // 64, 2, 32)
    packed = (chunked[:, :, :, 0] | (chunked[:, :, :, 1] << 4)).permute(0, 2, 1, 3).contiguous()
    offsets = block_offsets.to(torch.float16).reshape(n // 4, 4, k // 32).permute(0, 2, 1).contiguous()
    return packed, tile_block_scales(block_scales), offsets


def pack_int8(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes int8 [N, K] and scales [N, 1] (per row) or [N, K / 32] (per 32 channels) -> lmport.kernels.cpu_vnni's
    int8 layout: code + 128 as uint8 [N/4, K/64, 4, 64]; scales float [N], or float16 [N/4, K/64, 4, 2]."""
    n, k = codes.shape
    unsigned = (codes.to(torch.int16) + 128).to(torch.uint8)
    packed = unsigned.reshape(n // 4, 4, k // 64, 64).permute(0, 2, 1, 3).contiguous()
    if scales.shape[1] == 1:
        return packed, scales.float().reshape(n).contiguous()
    return packed, tile_block_scales(scales)


def check_quantizable(model: nn.Module, method: str, group_size: int, device: torch.device) -> None:
    """Every Linear can take `method` on `device`; else an InvalidParams naming the option and the layer."""
    from lmport.engine.models.layers import Linear

    if method not in METHODS:
        raise InvalidParams("quantization", f"must be one of {list(METHODS)} or null, got {method!r}")
    if device.type != "cpu":
        raise InvalidParams("quantization", f"{method} weight-only quantization runs on CPU only (device is "
                                            f"{device}); use the model dtype on {device.type}")
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        out_features, in_features = module.weight.shape
        if method == "int8" and in_features % 16:  # torch's int8 kernel, run for prefill, reads out of bounds
            raise InvalidParams("quantization", f"int8 needs input features in multiples of 16; layer {name} has "
                                f"{in_features}: use the model dtype")
        if method == "int4" and in_features % max(group_size, 16 * _INT4_INNER_K_TILES):
            raise InvalidParams("quantization_group_size", f"layer {name} has {in_features} input features, not "
                                f"a multiple of the int4 group size {group_size}; choose a group size that divides "
                                f"it, or quantization='int8'")
        if method == "int4" and out_features % 16:
            raise InvalidParams("quantization", f"int4 needs output features in multiples of 16; layer {name} has "
                                f"{out_features}: use quantization='int8'")


def shared_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters a module other than a Linear holds too (a tied embedding): never released."""
    from lmport.engine.models.layers import Linear

    return {id(p) for m in model.modules() if not isinstance(m, Linear) for p in m.parameters(recurse=False)}


def attach_quantized(module: nn.Module, form: Int8Weight | Int4Weight, shared: set[int]) -> None:
    """Serve `module` (a Linear) from `form`; its plain weight is released unless it is in `shared`."""
    module.quantized = form
    if id(module.weight) not in shared:
        module.weight.data = module.weight.data.new_empty(0)


def quantize_linears(model: nn.Module, method: str, group_size: int) -> int:
    """Replace every Linear's weight by its `method` form (check_quantizable first). The plain weight is released
    unless another module shares it (a tied embedding). Returns the number of Linears quantized."""
    from lmport.engine.models.layers import Linear

    shared = shared_parameters(model)
    count = 0
    for module in model.modules():
        if not isinstance(module, Linear) or module.weight.numel() == 0:
            continue
        weight = module.weight.detach()
        attach_quantized(module, Int8Weight.quantize(weight) if method == "int8"
                         else Int4Weight.quantize(weight, group_size), shared)
        count += 1
    return count
