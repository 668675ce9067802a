"""The kernel API the model code calls, with one dispatch point per kernel.

Backend per call: the innermost `with use_backend(...)` block of the calling thread (an engine runs its model calls
in one, so engines with different backends can share a process), else `set_backend("torch" | "triton" | "auto")`, the
process default; "auto" at either level defers to the LMPORT_KERNEL_BACKEND environment variable (read at import),
else it is "auto". "auto" runs Triton on CUDA tensors; on CPU
tensors it runs the compiled C++ kernels of lmport.kernels.cpu for paged_attention_decode, rms_norm, rotary_embedding and
silu_and_mul (each falling back to the reference itself if the extension cannot be built) and the PyTorch reference
(lmport.kernels.reference) for the rest; "torch" forces the reference everywhere (debugging on CUDA; the pure-PyTorch CPU
path); "triton" forces Triton everywhere, which on CPU needs TRITON_INTERPRET=1 set before triton is first imported
(the kernel tests do this).
The Triton modules are imported on first use, so the CPU path never loads a Triton kernel.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch

from lmport.kernels import reference

BACKENDS = ("auto", "triton", "torch")

__all__ = ["BACKENDS", "set_backend", "use_backend", "get_backend", "prepare", "store_kv_cache",
           "paged_attention_decode", "paged_attention_prefill", "rms_norm", "rotary_embedding", "silu_and_mul"]


def _checked(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


_env_backend = _checked(os.environ.get("LMPORT_KERNEL_BACKEND", "auto"), "LMPORT_KERNEL_BACKEND")
_backend = "auto"
# Per thread (and asyncio task): a context variable starts unset in every new thread.
_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar("lmport_kernel_backend", default=None)


def set_backend(name: str) -> None:
    """Select the process default for every later call outside a use_backend block ("auto" defers to
    LMPORT_KERNEL_BACKEND, then to the device)."""
    global _backend
    _backend = _checked(name, "kernel_backend")


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the kernel calls of this block, on this thread, with `name` over the process default ("auto" defers to
    LMPORT_KERNEL_BACKEND, as in set_backend). Blocks nest; other threads are unaffected."""
    token = _scoped.set(_checked(name, "kernel_backend"))
    try:
        yield
    finally:
        _scoped.reset(token)


def get_backend() -> str:
    """The backend in force for this thread: "auto", "triton" or "torch"."""
    name = _scoped.get() or _backend
    return name if name != "auto" else _env_backend


@functools.cache
def _triton_module(name: str) -> ModuleType:
    return importlib.import_module(f"lmport.kernels.triton_{name}")


@functools.cache
def _cpu() -> ModuleType:
    return importlib.import_module("lmport.kernels.cpu")


def prepare(device: torch.device) -> None:
    """Build (or load from the cache) whatever the kernels for device need, so that no request waits for it."""
    if device.type == "cpu" and get_backend() == "auto":
        _cpu().load()


def _impl_cpu(tensor: torch.Tensor, triton_module: str) -> ModuleType:
    """_impl, except that "auto" on a CPU tensor picks the compiled C++ kernels (lmport.kernels.cpu)."""
    impl = _impl(tensor, triton_module)
    if impl is reference and get_backend() == "auto" and tensor.device.type == "cpu":
        impl = _cpu()  # falls back to the reference itself if the extension can't be built
    return impl


def _impl(tensor: torch.Tensor, triton_module: str) -> ModuleType:
    backend = get_backend()
    if backend == "torch" or (backend == "auto" and not tensor.is_cuda):
        return reference
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"kernel_backend 'triton' on a {tensor.device.type} tensor needs TRITON_INTERPRET=1 "
                           "in the environment before triton is imported (or use 'auto' / 'torch')")
    return _triton_module(triton_module)


def store_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """key/value [N, Hkv, D] into k_cache/v_cache [num_blocks, block_size, Hkv, D] at slot_mapping; -1 is skipped.
    An fp8 cache stores key / k_scale and value / v_scale, saturated (reference.quantize_kv)."""
    _impl(key, "cache").store_kv_cache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """One query per sequence [B, Hq, D], at position seq_len-1, over keys 0..seq_len-1 of its blocks.

    sliding_window: only the last sliding_window keys are seen (transformers' window: position p sees j with
    p - j < sliding_window). soft_cap: scores become soft_cap * tanh(q.k * scale / soft_cap) (Gemma 2).
    k_scale / v_scale: an fp8 cache's per-tensor scales (its entries times the scale are K and V)."""
    return _impl_cpu(q, "attention").paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                                            sliding_window=sliding_window, soft_cap=soft_cap,
                                                            k_scale=k_scale, v_scale=v_scale)


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                            max_query_len: int, scale: float, sliding_window: int | None = None,
                            soft_cap: float | None = None, k_scale: float = 1.0,
                            v_scale: float = 1.0) -> torch.Tensor:
    """Varlen causal attention [N, Hq, D]; sequence s's queries are the last q_len_s of its seq_lens[s] keys.
    sliding_window, soft_cap, k_scale and v_scale as in paged_attention_decode."""
    return _impl_cpu(q, "attention").paged_attention_prefill(
        q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, max_query_len, scale,
        sliding_window=sliding_window, soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x/rms(x)*w; with residual, r = x + residual and the result is (rms_norm(r)*w, r)."""
    return _impl_cpu(x, "norm").rms_norm(x, weight, eps, residual)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox rotary on q [N, Hq*D] and k [N, Hkv*D]; may rotate in place, so use the returned tensors."""
    return _impl_cpu(q, "rope").rotary_embedding(positions, q, k, cos_sin_cache, head_dim)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:] for x [N, 2I]."""
    return _impl_cpu(x, "activation").silu_and_mul(x)
