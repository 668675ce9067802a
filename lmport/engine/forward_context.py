"""Per-step attention metadata shared by every attention layer of one forward pass.

The model runner builds one AttentionMetadata per step and installs it for the duration of the forward call, so that
model code keeps the plain `forward(input_ids, positions)` signature. The installed metadata belongs to the calling
thread: engines in one process (each stepping on its own thread) never see each other's.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64[T]: cache slot of each new token's K/V (-1 = skip)
    num_decode_tokens: int  # rows [0, D) are decode tokens, one per sequence; rows [D, T) are prefill tokens
    decode_block_tables: torch.Tensor  # int32[D, M]
    decode_seq_lens: torch.Tensor  # int32[D], context length including the new token
    prefill_cu_seqlens_q: torch.Tensor  # int32[S+1], query offsets relative to row D
    prefill_seq_lens: torch.Tensor  # int32[S], cached context + new tokens
    prefill_block_tables: torch.Tensor  # int32[S, M]
    max_query_len: int


# A context variable, so per thread (and asyncio task): it starts unset in every new thread.
_current: contextvars.ContextVar[AttentionMetadata | None] = contextvars.ContextVar("lmport_forward_context",
                                                                                   default=None)


def set_forward_context(meta: AttentionMetadata | None) -> None:
    _current.set(meta)


def get_forward_context() -> AttentionMetadata:
    meta = _current.get()
    if meta is None:
        raise RuntimeError("attention layers ran outside a forward context "
                           "(use lmport.engine.forward_context.forward_context)")
    return meta


@contextmanager
def forward_context(meta: AttentionMetadata) -> Iterator[AttentionMetadata]:
    token = _current.set(meta)
    try:
        yield meta
    finally:
        _current.reset(token)


@dataclass(slots=True)
class StepInputs:
    """One step's model inputs as host lists, before they become tensors: what a tensor-parallel rank receives from
    rank 0 to run the same forward (lmport.engine.parallel packs them into one tensor)."""
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    seq_lens: list[int]  # per sequence: context length including this step's tokens
    query_starts: list[int]  # [S+1]: each sequence's first row in input_ids, then the row count
    num_decodes: int
    block_tables: list[list[int]]  # padded to one width
    copies: list[tuple[int, int]]  # KV blocks to copy (source, destination) before the forward

    @property
    def max_query_len(self) -> int:
        return max(b - a for a, b in zip(self.query_starts, self.query_starts[1:]))
