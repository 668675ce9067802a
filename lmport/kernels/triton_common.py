"""Shared bits of the Triton kernels: interpreter detection, compile settings, argument checks."""

from __future__ import annotations

import os

import torch
from triton import knobs

# Keep FMA contraction on (Triton <= 3.9's default, read at compile time); setting it also silences 3.9's warning
# about the default changing in 3.10.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# Under TRITON_INTERPRET=1 (CPU tests) kernels upcast to fp32 before tl.dot: the interpreter's low-precision dot
# is wrong for bf16. Read once, like triton.jit does when it decorates the kernels.
INTERPRET: bool = bool(knobs.runtime.interpret)


def check_last_dim_contiguous(name: str, tensor: torch.Tensor) -> None:
    """The kernels address rows by stride but read each row's last dimension as one contiguous run."""
    if tensor.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride {tensor.stride()})")
