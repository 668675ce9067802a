"""Copying a checkpoint's HF-named tensors into a native model whose projections may be fused (q|k|v, gate|up)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from lmport.engine.errors import UnsupportedModel
from lmport.engine.models.layers import Linear

# checkpoint name -> (parameter name, shard index of a fused Linear or None), or None for a tensor to skip
Placement = Callable[[str], "tuple[str, int | None] | None"]


def load_checkpoint(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], place: Placement) -> None:
    """Copy every tensor to where `place` puts it, converting dtype and device. Raises UnsupportedModel when a
    tensor has no place, a wrong shape, or a parameter stays unloaded."""
    params = dict(model.named_parameters())
    loaded: set[tuple[str, int | None]] = set()
    for name, tensor in weights:
        placement = place(name)
        if placement is None:
            continue
        target, shard = placement
        param = params.get(target)
        if param is None:
            raise UnsupportedModel(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
        dest = param
        if shard is not None:
            module = model.get_submodule(target.rsplit(".", 1)[0])
            start = module.shard_offsets[shard]
            dest = param[start:start + module.output_sizes[shard]]
        if dest.shape != tensor.shape:
            raise UnsupportedModel(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                   f"expected {tuple(dest.shape)}")
        dest.copy_(tensor)
        module = model.get_submodule(target.rsplit(".", 1)[0]) if shard is None and "." in target else None
        if isinstance(module, Linear) and len(module.output_sizes) > 1:  # a checkpoint that is fused already (Phi-3)
            loaded |= {(target, i) for i in range(len(module.output_sizes))}
        else:
            loaded.add((target, shard))
    missing = sorted(f"{n}[{s}]" if s is not None else n for n, s in _expected_tensors(model) - loaded)
    if missing:
        raise UnsupportedModel(f"checkpoint lacks {len(missing)} tensor(s): {', '.join(missing[:4])}")


def _expected_tensors(model: nn.Module) -> set[tuple[str, int | None]]:
    expected: set[tuple[str, int | None]] = set()
    seen: set[int] = set()  # a tied lm_head shares the embedding's parameter: expect it once
    for module_name, module in model.named_modules():
        for kind, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{kind}"
            if isinstance(module, Linear) and len(module.output_sizes) > 1:
                expected |= {(name, i) for i in range(len(module.output_sizes))}
            else:
                expected.add((name, None))
    return expected
