"""AWQ and GPTQ checkpoints: 4-bit group-wise weights that were quantized offline, loaded as `Int4Weight` codes.

Both store, per Linear `name`: `name.qweight` (eight 4-bit codes per int32), `name.qzeros` (the groups' integer
zero points, packed the same way), `name.scales` ([K / group, N], fp16) and, for GPTQ, `name.g_idx` (each input
channel's group). The weight is (code - zero) * scale, so the codes go to torch's int4 kernel unchanged, exactly as
the checkpoint holds them (no re-quantization).

- AWQ (AutoAWQ's "gemm" layout): qweight [K, N / 8], codes packed along N in the order 0 2 4 6 1 3 5 7.
- GPTQ: qweight [K / 8, N], codes packed along K in order; qzeros along N in order. The original format
  ("gptq", AutoGPTQ) stores zero - 1; GPTQModel's "gptq_v2" stores the zero itself.

The layouts are pinned by tests/data/prequantized_golden.safetensors, written by AutoAWQ's and AutoGPTQ's own pack
code (tests/data/make_prequantized_golden.py). Hand-written here because neither library installs against this
torch (their CUDA extensions), and the unpacking is a few lines of shifts.

While loading, each quantized Linear also yields its dequantized weight, so the family's name mapping, fused
projections and completeness check work unchanged; the plain weight is released once the codes are attached.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmport.engine.errors import InvalidParams, Unsupported
from lmport.engine.quantization import GROUP_SIZES, Int4Weight, attach_quantized, shared_parameters

METHODS = ("awq", "gptq")
_AWQ_ORDER = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # the column each packed nibble holds (AutoAWQ's reverse order)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
_PARTS = ("qweight", "qzeros", "scales")


@dataclass(frozen=True, slots=True)
class CheckpointQuantization:
    method: str  # "awq" | "gptq"
    group_size: int
    zeros_minus_one: bool  # GPTQ's original format stores zero - 1

    def codes(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes [N, K] 0..15, scales [N, K / g], zeros [N, K / g]) of one Linear's packed tensors."""
        qweight, qzeros, scales = (tensors[part] for part in _PARTS)
        zeros = _unpack_columns(qzeros)
        if self.method == "awq":
            codes, zeros = _awq_columns(_unpack_columns(qweight)), _awq_columns(zeros)
        else:
            codes = _unpack_rows(qweight)
            zeros = zeros + 1 if self.zeros_minus_one else zeros
            _check_group_order(tensors.get("g_idx"), codes.shape[0], self.group_size)
        if codes.shape[0] != scales.shape[0] * self.group_size:
            raise Unsupported("quantization", f"{self.method} weight of {codes.shape[0]} input channels has "
                                              f"{scales.shape[0]} groups, not group_size {self.group_size}")
        return codes.t().contiguous(), scales.t().float().contiguous(), zeros.t().float().contiguous()


def _unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """[R, C / 8] int32 -> [R, C]: nibble j of word c is column 8c + j."""
    return ((packed[:, :, None] >> _SHIFTS) & 0xF).reshape(packed.shape[0], -1)


def _unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """[R / 8, C] int32 -> [R, C]: nibble j of word r is row 8r + j."""
    return ((packed[:, None, :] >> _SHIFTS[:, None]) & 0xF).reshape(-1, packed.shape[1])


def _awq_columns(unpacked: torch.Tensor) -> torch.Tensor:
    order = (torch.arange(unpacked.shape[1]).reshape(-1, 8)[:, _AWQ_ORDER]).reshape(-1)
    return unpacked[:, order]


def _check_group_order(g_idx: torch.Tensor | None, in_features: int, group_size: int) -> None:
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(in_features) // group_size):
        raise _act_order()


def _act_order() -> Unsupported:
    return Unsupported("quantization", "GPTQ checkpoints quantized with act-order (desc_act: true, a permuted g_idx) "
                                       "are not supported: the int4 kernel needs contiguous groups; use a checkpoint "
                                       "made with desc_act false")


def checkpoint_quantization(hf_config: Any, requested: str | None, model_path: object) -> CheckpointQuantization | None:
    """The checkpoint's own quantization (config.json's quantization_config), checked against the `quantization`
    option as vLLM does: null or the same method loads it; anything else is an error."""
    found = getattr(hf_config, "quantization_config", None)
    if not found:
        if requested in METHODS:
            raise InvalidParams("quantization", f"{requested!r} loads {requested.upper()} checkpoints, but "
                                f"{model_path} has no quantization_config; use quantization='int4' to quantize it "
                                "on load, or null")
        return None
    settings = found if isinstance(found, dict) else found.to_dict()
    method = str(settings.get("quant_method", "?")).lower()
    if method not in METHODS:
        raise Unsupported("quantization", f"{model_path} is a pre-quantized checkpoint ({method}); lmport loads "
                                          f"{', '.join(METHODS)} checkpoints: load the unquantized model with "
                                          "quantization='int4' (or 'int8')")
    if requested is not None and requested != method:
        raise InvalidParams("quantization", f"{model_path} is a {method} checkpoint; pass quantization={method!r} "
                                            f"or leave it null, not {requested!r}")
    bits = settings.get("bits", settings.get("w_bit"))
    group_size = int(settings.get("group_size", settings.get("q_group_size", -1)))
    if bits != 4:
        raise Unsupported("quantization", f"{method} with {bits} bits: only 4-bit checkpoints load")
    if group_size not in GROUP_SIZES:
        raise Unsupported("quantization", f"{method} group_size {group_size}: the int4 kernel takes groups of "
                                          f"{', '.join(map(str, GROUP_SIZES))}")
    if method == "awq":
        version = str(settings.get("version", "gemm")).lower()
        if version != "gemm" or not settings.get("zero_point", True):
            raise Unsupported("quantization", f"AWQ version {version!r} (zero_point {settings.get('zero_point')}) "
                                              "is not supported; lmport reads AutoAWQ's 'gemm' layout with zero "
                                              "points")
    elif settings.get("desc_act"):
        raise _act_order()
    return CheckpointQuantization(method, group_size,
                                  zeros_minus_one=method == "gptq" and settings.get("checkpoint_format") != "gptq_v2")


def check_prequantized_target(quantization: CheckpointQuantization, device: torch.device,
                              tensor_parallel_size: int) -> None:
    if device.type != "cpu":
        raise InvalidParams("quantization", f"{quantization.method} checkpoints run on the CPU int4 kernel only "
                                            f"(device is {device}); pass device='cpu'")
    if tensor_parallel_size > 1:
        raise Unsupported("tensor_parallel_size", f"{quantization.method} checkpoints are not sharded across "
                                                  "tensor-parallel ranks; use tensor_parallel_size 1")


def dequantizing(weights: Iterable[tuple[str, torch.Tensor]], quantization: CheckpointQuantization,
                 codes: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors, each quantized Linear's packed parts replaced by `name.weight` (dequantized,
    [N, K]); their codes land in `codes[name]`. Packed parts are kept until the last shard is read (they may be
    split across files), then unpacked."""
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, _, part = name.rpartition(".")
        if part in (*_PARTS, "g_idx"):
            packed.setdefault(prefix, {})[part] = tensor
        else:
            yield name, tensor
    for prefix, parts in packed.items():
        if missing := sorted(set(_PARTS) - set(parts)):
            raise Unsupported("quantization", f"quantized tensor {prefix} lacks {', '.join(missing)}")
        codes[prefix] = quantization.codes(parts)
        yield f"{prefix}.weight", dequantize(*codes[prefix], quantization.group_size)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """(code - zero) * scale, [N, K] float32."""
    return (codes.float() - zeros.repeat_interleave(group_size, 1)) * scales.repeat_interleave(group_size, 1)


def attach_prequantized(model: nn.Module, codes: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                        group_size: int, dtype: torch.dtype) -> int:
    """Give every Linear whose checkpoint projections were all quantized their codes as an Int4Weight (fused
    projections concatenated in row order); the rest (lm_head, usually) keep their weights. Returns the count."""
    from lmport.engine.models.layers import Linear
    from lmport.engine.models.llama import checkpoint_parts

    shared, count, used = shared_parameters(model), 0, set()
    for module_name, module in model.named_modules():
        if not isinstance(module, Linear) or module.weight.numel() == 0:
            continue
        names = [module_name] if module_name in codes else checkpoint_parts(module_name)
        if not all(name in codes for name in names):
            continue
        parts = [codes[name] for name in names]
        codes_cat, scales, zeros = (torch.cat([p[i] for p in parts]) for i in range(3))
        if codes_cat.shape[0] % 16:
            raise Unsupported("quantization", f"layer {module_name} has {codes_cat.shape[0]} output features; the "
                                              "int4 kernel needs multiples of 16")
        attach_quantized(module, Int4Weight.from_codes(codes_cat, scales, -zeros * scales, group_size, dtype),
                         shared)
        used.update(names)
        count += 1
    if unused := sorted(set(codes) - used):
        raise Unsupported("quantization", f"quantized tensors {', '.join(unused[:3])} map to no Linear of this "
                                          "model (quantized MoE experts are not supported)")
    return count
