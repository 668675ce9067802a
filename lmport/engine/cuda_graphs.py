"""Decode steps replayed from captured CUDA graphs, one graph per batch-size bucket (as in vLLM and nano-vllm).

Why: a decode step launches about ten kernels per layer, and for a small model each finishes sooner than Python can
launch the next, so the GPU idles between them. Replaying a captured graph issues the whole step at once.

How: every graph reads the same static input buffers, sliced to its bucket. A batch of n sequences is copied into
rows [0, n) and padded up to the smallest captured size >= n. Padded rows store no K/V (slot -1) and attend a single
key of whatever block their table row names, so they cost little and touch no real sequence; their outputs are
dropped. The block-table buffer is max_model_len wide, so the decode kernel's split-K count, fixed at capture, suits
every context; the kernel reads only the table entries below each row's own length, so entries left over from
earlier, wider batches are never followed.

A bucket without a captured graph runs the same static-buffer forward eagerly: that is how the padding logic is
tested on machines without a GPU.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch
from torch import nn

from lmport.engine.forward_context import AttentionMetadata, forward_context

logger = logging.getLogger("lmport")

MAX_CAPTURE_SIZE = 512  # vLLM's default largest captured batch; larger decode batches are bound by the matmuls


def capture_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to min(max_batch_size, 512), which is always included."""
    limit = min(max_batch_size, MAX_CAPTURE_SIZE)
    sizes = [s for s in (1, 2, 4, 8, *range(16, limit + 1, 16)) if s <= limit]
    if sizes[-1] != limit:
        sizes.append(limit)
    return sizes


class DecodeGraphs:
    """Static decode inputs plus the graphs captured on them. `run` takes one decode-only batch's tensors.

    The hidden-state buffer takes the model's hidden size (`model.config.hidden_size`), dtype and device (its
    parameters').
    """

    def __init__(self, model: nn.Module, max_batch_size: int, max_blocks_per_seq: int) -> None:
        self.model = model
        self.sizes = capture_sizes(max_batch_size)
        rows = self.sizes[-1]
        weight = next(model.parameters())
        dtype, device, hidden_size = weight.dtype, weight.device, model.config.hidden_size
        self.input_ids = torch.zeros(rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(rows, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((rows, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.hidden = torch.zeros((rows, hidden_size), dtype=dtype, device=device)
        self.no_prefill = torch.zeros(1, dtype=torch.int32, device=device)  # cu_seqlens of zero prefill sequences
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def bucket(self, batch_size: int) -> int:
        """The smallest captured size that holds batch_size (which must be 1..max_batch_size)."""
        if not 1 <= batch_size <= self.max_batch_size:
            raise ValueError(f"decode batch of {batch_size} outside 1..{self.max_batch_size}")
        return self.sizes[bisect.bisect_left(self.sizes, batch_size)]

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], num_decode_tokens=size,
            decode_block_tables=self.block_tables[:size], decode_seq_lens=self.seq_lens[:size],
            prefill_cu_seqlens_q=self.no_prefill, prefill_seq_lens=self.seq_lens[:0],
            prefill_block_tables=self.block_tables[:0], max_query_len=1)

    def _forward(self, size: int) -> None:
        with forward_context(self._metadata(size)):
            self.hidden[:size] = self.model(self.input_ids[:size], self.positions[:size])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per size, largest first so that the smaller ones reuse its memory pool."""
        start = time.perf_counter()
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up outside the capture: compiles the kernels for this shape
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch 1..%d) in %.1f s", len(self.graphs), self.max_batch_size,
                    time.perf_counter() - start)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Decode the batch described by input_ids/positions [n] and meta (decode rows only) -> hidden [n, H]."""
        n = input_ids.shape[0]
        size = self.bucket(n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[:n].copy_(meta.decode_seq_lens)
        self.seq_lens[n:size].fill_(1)
        tables = meta.decode_block_tables
        self.block_tables[:n, :tables.shape[1]].copy_(tables)
        graph = self.graphs.get(size)
        if graph is None:
            self._forward(size)
        else:
            graph.replay()
        return self.hidden[:n]
