"""Write tests/data/prequantized_golden.safetensors: AWQ and GPTQ 4-bit layers packed by the reference libraries'
own code, with what those libraries compute from them. tests/test_prequantized.py checks lmport's unpacking against
it, so the checkpoint layouts are pinned to AutoAWQ's and AutoGPTQ's, not to our reading of them.

Neither library installs against torch 2.13 (CUDA extensions), but the modules used here are plain torch; they are
imported from the unpacked PyPI files without running the packages' __init__:

    pip download auto-gptq==0.7.1 --no-deps -d /tmp/q && (cd /tmp/q && unzip -q auto_gptq-*.whl)
    curl -sL "$(curl -s https://pypi.org/simple/autoawq/ | grep -o 'https://[^"#]*autoawq-0.2.9.tar.gz' | head -1)" \
        | tar xz -C /tmp/q
    .venv/bin/python tests/data/make_prequantized_golden.py /tmp/q/autoawq-0.2.9 /tmp/q
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

IN_FEATURES, OUT_FEATURES, GROUP_SIZE = 64, 96, 32  # AutoAWQ packs N in multiples of 32


def _import_without_init(root: Path, package: str, module: str) -> types.ModuleType:
    """Import root/<package path>/<module>.py with its parent packages as bare namespaces (no __init__ runs)."""
    parts = package.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        stub = types.ModuleType(name)
        stub.__path__ = [str(root.joinpath(*parts[:i]))]
        sys.modules[name] = stub
    return importlib.import_module(f"{package}.{module}")


def _group_params(weight: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scales, integer zeros), [K / g, N] each, as AutoAWQ's and GPTQ's quantizers produce them."""
    groups = weight.t().reshape(IN_FEATURES // GROUP_SIZE, GROUP_SIZE, OUT_FEATURES)
    low, high = groups.amin(dim=1), groups.amax(dim=1)
    if symmetric:
        scales = torch.maximum(high.abs(), low.abs()) * 2 / 15
        zeros = torch.full_like(scales, 8.0)
    else:
        scales = (high - low) / 15
        zeros = torch.round(-low / scales).clamp(0, 15)
    return scales.half().float(), zeros


def main(awq_root: Path, gptq_root: Path, out: Path) -> None:
    torch.manual_seed(0)
    gemm = _import_without_init(awq_root, "awq.modules.linear", "gemm")
    gptq = _import_without_init(gptq_root, "auto_gptq.nn_modules.qlinear", "qlinear_cuda_old")
    identity = torch.eye(IN_FEATURES)
    tensors: dict[str, torch.Tensor] = {}

    linear = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False)
    scales, zeros = _group_params(linear.weight.data, symmetric=False)
    awq = gemm.WQLinear_GEMM.from_linear(linear, 4, GROUP_SIZE, scales=scales.half(), zeros=zeros.int())
    tensors |= {"awq.qweight": awq.qweight, "awq.qzeros": awq.qzeros, "awq.scales": awq.scales,
                # AutoAWQ's own dequantization (what its CPU forward multiplies by), [K, N]
                "awq.dequantized": gemm.dequantize_gemm(awq.qweight, awq.qzeros, awq.scales, 4, GROUP_SIZE).float()}

    for name, symmetric in (("gptq_asym", False), ("gptq_sym", True)):
        linear = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False)
        scales, zeros = _group_params(linear.weight.data, symmetric)
        layer = gptq.QuantLinear(4, GROUP_SIZE, IN_FEATURES, OUT_FEATURES, bias=False)
        g_idx = torch.arange(IN_FEATURES, dtype=torch.int32) // GROUP_SIZE
        layer.pack(linear, scales.t(), zeros.t(), g_idx)  # pack takes [N, K / g]
        layer.g_idx = g_idx
        with torch.no_grad():  # AutoGPTQ's CPU forward on the identity: its dequantized weight, [K, N]
            dequantized = layer(identity).float()
        tensors |= {f"{name}.qweight": layer.qweight, f"{name}.qzeros": layer.qzeros, f"{name}.scales": layer.scales,
                    f"{name}.g_idx": g_idx, f"{name}.dequantized": dequantized}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out))
    print(f"wrote {out}: {sorted(tensors)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(__file__).with_name("prequantized_golden.safetensors"))
