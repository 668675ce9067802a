"""Builders shared by the kernel tests: interpreter switch, seeds, poisoned outputs, paged-cache cases, the rotary
cache."""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

import torch

TRITON_MODULES = ("common", "cache", "norm", "rope", "activation", "attention")
# Tolerances on ||actual - expected|| / ||expected||. bf16 is loose because the interpreter truncates fp32 -> bf16
# where a GPU rounds to nearest.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2e-2}
# With a GPU the kernel tests check the compiled kernels on it; without one, the interpreter on CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def enable_triton_interpreter() -> None:
    """Without a GPU, run the Triton kernels in the interpreter; call before importing kernels.triton_*.

    TRITON_INTERPRET is read when each @triton.jit function is decorated. triton is usually imported already when a
    test module loads (torch._dynamo imports it, and transformers imports that), with triton.language's own jit
    functions (tl.sum, tl.cdiv, ...) decorated for compilation; those modules and ours are then decorated again.
    """
    if DEVICE.type == "cuda":
        return
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton.language" in sys.modules:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(tl.sum, InterpretedFunction):
            for name in ("triton.language.standard", "triton.language.random", "triton.language"):
                if name in sys.modules:
                    importlib.reload(sys.modules[name])
    common = sys.modules.get("lmport.kernels.triton_common")
    if common is not None and not common.INTERPRET:
        for name in TRITON_MODULES:
            if f"lmport.kernels.triton_{name}" in sys.modules:
                importlib.reload(sys.modules[f"lmport.kernels.triton_{name}"])
        from lmport import kernels
        kernels._triton_module.cache_clear()


def rope_cache(max_positions: int, head_dim: int) -> torch.Tensor:
    """The engine's own float32 cos/sin cache (lmport.engine.models.rope.cos_sin_cache) for default RoPE, theta 10000."""
    from transformers import PretrainedConfig

    from lmport.engine.models.rope import cos_sin_cache
    return cos_sin_cache(PretrainedConfig(), head_dim, max_positions)


def fresh_seed() -> int:
    """A new seed every run (LMPORT_TEST_SEED replays one); tests put it in their assertion messages."""
    seed = int(os.environ.get("LMPORT_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    return seed


def poisoned(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An output buffer full of NaN on DEVICE: any element a kernel forgets to write fails the comparison."""
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=DEVICE)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN anywhere gives NaN (which fails `< tol`)."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@dataclass
class PagedCase:
    """Sequences whose K/V sit in a paged cache under shuffled block tables, plus the same K/V kept contiguous.

    Unused cache slots hold `fill` (0 by default, as the engine zeroes its cache; NaN to prove a kernel never reads
    past a sequence's last key). Block 0 is never allocated, so padded table entries point at an unused block.
    """
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D], on DEVICE like the tables
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [S, M], padded with 0
    seq_lens: torch.Tensor  # int32 [S]
    keys: list[torch.Tensor]  # per sequence [seq_len, Hkv, D], on the CPU (for the naive implementation)
    values: list[torch.Tensor]

    def with_unused(self, fill: float) -> PagedCase:
        k_cache = torch.full(self.k_cache.shape, fill, dtype=self.k_cache.dtype)
        v_cache = torch.full(self.v_cache.shape, fill, dtype=self.v_cache.dtype)
        size = self.k_cache.shape[1]
        for table, keys, values in zip(self.block_tables.tolist(), self.keys, self.values):
            for pos in range(keys.shape[0]):
                k_cache[table[pos // size], pos % size] = keys[pos]
                v_cache[table[pos // size], pos % size] = values[pos]
        return PagedCase(k_cache.to(DEVICE), v_cache.to(DEVICE), self.block_tables, self.seq_lens, self.keys,
                         self.values)

    def with_blocks_before(self, first_keys: list[int], fill: float) -> PagedCase:
        """A copy whose blocks lying wholly before each sequence's first visible key (a sliding window's start)
        hold `fill` and whose table entries for them are -1, as the engine leaves them when it frees those blocks:
        a windowed kernel must never read them."""
        k_cache, v_cache, tables = self.k_cache.clone(), self.v_cache.clone(), self.block_tables.clone()
        size = self.k_cache.shape[1]
        for s, first in enumerate(first_keys):
            for block in tables[s, :first // size].tolist():
                k_cache[block], v_cache[block] = fill, fill
            tables[s, :first // size] = -1
        return PagedCase(k_cache, v_cache, tables, self.seq_lens, self.keys, self.values)


def make_paged_case(seq_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype, spare_blocks: int = 3) -> PagedCase:
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(blocks_per_seq) + 1  # one more column than needed: padding must be ignored
    num_blocks = 1 + sum(blocks_per_seq) + spare_blocks
    order = (torch.randperm(num_blocks - 1) + 1).tolist()  # shuffled physical blocks, block 0 left unused
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    for s, count in enumerate(blocks_per_seq):
        tables[s, :count] = torch.tensor(order[:count], dtype=torch.int32)
        order = order[count:]
    keys = [torch.randn(n, num_kv_heads, head_dim).to(dtype) for n in seq_lens]
    values = [torch.randn(n, num_kv_heads, head_dim).to(dtype) for n in seq_lens]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    empty = PagedCase(torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype), tables.to(DEVICE),
                      torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), keys, values)
    return empty.with_unused(0.0)
