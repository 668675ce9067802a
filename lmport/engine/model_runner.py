"""Runs one scheduled batch through the model: flattened varlen inputs in, logits of the rows that need them out.

Owns the paged KV cache (one tensor, viewed per layer by every PagedAttention module).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from lmport import kernels
from lmport.engine.config import CPU_DEFAULT_KV_CACHE_BYTES, EngineConfig, GiB
from lmport.engine.cpu_decode import CpuDecodeStack
from lmport.engine.cuda_graphs import DecodeGraphs
from lmport.engine.errors import OutOfKVCache
from lmport.engine.forward_context import AttentionMetadata, StepInputs, forward_context
from lmport.engine.lora import LoRABatch, LoRAManager, batch_for, lora_context
from lmport.engine.loader import LoadedModel
from lmport.engine.models.layers import PagedAttention
from lmport.engine.pooling import chunk_pool
from lmport.engine.scheduler import ScheduledBatch

logger = logging.getLogger("lmport")

@dataclass(slots=True)
class StepLogits:
    logits: torch.Tensor  # float32 [R, vocab]
    sample_rows: list[int]  # per scheduled seq: its row in logits, or -1 if it does not sample this step
    prompt_rows: dict[int, tuple[int, int]]  # seq position in batch -> (first row, row count) of prompt-logprob rows
    pooled: dict[int, torch.Tensor | None]  # seq position in batch -> its chunk's share of an embed request's pooling


# kv_cache_dtype -> the cache's element type ("auto": the model's)
KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


class ModelRunner:
    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        # This engine's kernels, installed around each of its model calls (never process-wide: another engine in the
        # same process may run another backend).
        self.kernel_backend = config.kernel_backend
        with kernels.use_backend(self.kernel_backend):
            kernels.prepare(loaded.device)
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.cache_dtype = KV_CACHE_DTYPES.get(config.kv_cache_dtype, loaded.dtype)
        self.block_size = config.block_size
        self.lora = (LoRAManager(self.model, config.max_loras, config.max_lora_rank,
                                 config.max_cpu_loras or config.max_loras, loaded.dtype, loaded.device)
                     if config.enable_lora else None)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        first = self.attention_layers[0]
        self.num_kv_heads, self.head_dim = first.num_kv_heads, first.head_dim
        # One window on every layer lets the block manager free blocks behind it; a global layer (Gemma's mixed
        # ones included) reads every block of the shared table, so then nothing can be freed.
        windows = {layer.sliding_window for layer in self.attention_layers}
        self.sliding_window: int | None = windows.pop() if len(windows) == 1 else None
        self.max_blocks_per_seq = -(-loaded.max_model_len // self.block_size)  # one max_model_len sequence's blocks
        self.num_blocks = self._plan_num_blocks(config, loaded.max_model_len)
        self.tp = loaded.tp  # this rank's tensor-parallel group (None: a single process)
        if self.tp is not None and self.tp.rank == 0:
            self.tp.wait_ready(self.num_blocks)  # the other ranks size their caches alike, then wait for steps
        shape = (2, len(self.attention_layers), self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        # Zeroed, not empty: padded block-table entries and masked positions are read with weight 0, and 0 * NaN
        # garbage would poison the output.
        self.kv_cache = torch.zeros(shape, dtype=self.cache_dtype, device=self.device)
        for i, layer in enumerate(self.attention_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        self.no_prefill = torch.zeros(1, dtype=torch.int32, device=self.device)  # cu_seqlens_q of no prefill
        with kernels.use_backend(self.kernel_backend):
            self.decode_graphs = self._capture_decode_graphs(config)
            # LoRA adapters attach to Linears at run time, so an engine that can load them runs the modules
            self.decode_stack = (CpuDecodeStack.build(self.model, self.cache_dtype)
                                 if self.device.type == "cpu" and not config.enforce_eager and self.lora is None
                                 and self.tp is None else None)
        self.graphed_steps = self.stack_steps = 0

    def _capture_decode_graphs(self, config: EngineConfig) -> DecodeGraphs | None:
        if self.device.type != "cuda" or config.enforce_eager:
            return None
        if kernels.get_backend() == "torch":
            logger.info("CUDA graphs off: the PyTorch reference kernels synchronise with the host "
                        "(kernel_backend='torch')")
            return None
        graphs = DecodeGraphs(self.model, config.max_num_seqs, self.max_blocks_per_seq)
        try:
            graphs.capture()
        except RuntimeError:  # a kernel that cannot be captured must not keep the engine from serving
            logger.warning("CUDA graph capture failed; decoding eagerly (enforce_eager=True skips the capture)",
                           exc_info=True)
            return None
        return graphs

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do in a single process)."""
        if self.tp is not None:
            self.tp.close()

    @property
    def bytes_per_block(self) -> int:
        element = torch.empty((), dtype=self.cache_dtype).element_size()
        return 2 * len(self.attention_layers) * self.block_size * self.num_kv_heads * self.head_dim * element

    def _plan_num_blocks(self, config: EngineConfig, max_model_len: int) -> int:
        per_block = self.bytes_per_block
        if config.num_gpu_blocks_override is not None:
            num_blocks, source = config.num_gpu_blocks_override, "num_gpu_blocks_override"
        elif config.kv_cache_memory_bytes is not None or self.device.type != "cuda":
            budget = config.kv_cache_memory_bytes or CPU_DEFAULT_KV_CACHE_BYTES
            num_blocks, source = budget // per_block, f"kv_cache_memory_bytes={budget}"
        else:
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * config.gpu_memory_utilization) - (total - free)
            num_blocks, source = max(budget, 0) // per_block, f"gpu_memory_utilization={config.gpu_memory_utilization}"
        needed = self.max_blocks_per_seq
        if num_blocks < needed:
            raise OutOfKVCache(
                f"The KV cache ({source}) holds {num_blocks} blocks of {self.block_size} tokens = "
                f"{num_blocks * self.block_size} tokens, but one sequence of max_model_len={max_model_len} needs "
                f"{needed} blocks ({needed * per_block / GiB:.2f} GiB at {per_block} bytes per block). "
                f"Raise kv_cache_memory_bytes (or gpu_memory_utilization) or lower max_model_len.")
        logger.info("KV cache: %d blocks x %d tokens (%.2f GiB, %s); max concurrency at max_model_len=%d: %.1fx",
                    num_blocks, self.block_size, num_blocks * per_block / GiB, source, max_model_len,
                    num_blocks / needed)
        return num_blocks

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A host list as a device tensor; on CUDA through pinned memory, so the copy does not stall the host."""
        if self.device.type != "cuda":
            return torch.tensor(values, dtype=dtype)
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepLogits:
        inputs = StepInputs(input_ids=[], positions=[], slot_mapping=[], seq_lens=[], query_starts=[0],
                            num_decodes=batch.num_decodes, block_tables=[], copies=list(batch.copies))
        size = self.block_size
        keep_rows: list[int] = []
        sample_rows: list[int] = []
        prompt_rows: dict[int, tuple[int, int]] = {}
        pool_rows: dict[int, int] = {}  # embed requests: seq position -> the chunk's first row (they never sample)
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            inputs.input_ids.extend(seq.token_ids[start:end])
            inputs.positions.extend(range(start, end))
            table = seq.block_table
            inputs.slot_mapping.extend(table[p // size] * size + p % size for p in range(start, end))
            inputs.seq_lens.append(end)
            num_rows = len(inputs.input_ids)
            inputs.query_starts.append(num_rows)
            first_row = num_rows - num_new
            request = seq.request
            if request.pooling is not None:
                pool_rows[i] = first_row
                sample_rows.append(-1)
                continue
            if request.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
                # Row p predicts token p + 1: prompt positions start .. num_prompt_tokens - 2 of this chunk.
                last = min(end, seq.num_prompt_tokens - 1)
                prompt_rows[i] = (len(keep_rows), last - start)
                keep_rows.extend(range(first_row, first_row + last - start))
            if end == seq.num_tokens:
                sample_rows.append(len(keep_rows))
                keep_rows.append(num_rows - 1)
            else:
                sample_rows.append(-1)
        max_blocks = max(len(s.block_table) for s in batch.seqs)
        inputs.block_tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in batch.seqs]

        adapters = batch_for([slot for seq, n in zip(batch.seqs, batch.num_new_tokens) for slot in
                              [seq.request.lora_slot] * n], self.device) if self.lora is not None else None
        # tensor parallel: the other ranks run the same forward on their shards
        with self.tp.step(inputs) if self.tp is not None else contextlib.nullcontext():
            hidden = self.forward(inputs, adapters)
        with kernels.use_backend(self.kernel_backend):
            pooled = {}
            for i, first_row in pool_rows.items():
                seq, num_new = batch.seqs[i], batch.num_new_tokens[i]
                start = seq.num_computed_tokens
                pooled[i] = chunk_pool(hidden[first_row:first_row + num_new], seq.request.pooling.pooling, start,
                                       start + num_new, seq.num_prompt_tokens)
            if not keep_rows:  # only embed requests this step: no logits at all
                logits = hidden.new_empty((0, 0))
            else:
                if keep_rows != list(range(len(inputs.input_ids))):  # e.g. a decode-only step keeps every row
                    hidden = hidden.index_select(0, self._to_device(keep_rows, torch.int64))
                logits = self.model.compute_logits(hidden)
        return StepLogits(logits=logits, sample_rows=sample_rows, prompt_rows=prompt_rows, pooled=pooled)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, adapters: LoRABatch | None = None) -> torch.Tensor:
        """The model's hidden states [T, H] for one step's inputs (every tensor-parallel rank runs this)."""
        if inputs.copies:
            src = self._to_device([s for s, _ in inputs.copies], torch.int64)
            dst = self._to_device([d for _, d in inputs.copies], torch.int64)
            cache = kernels.reference.byte_view(self.kv_cache)  # fp8 has no CPU index kernels; bytes copy exactly
            cache[:, :, dst] = cache[:, :, src]
        d = inputs.num_decodes
        decode_only = d == len(inputs.seq_lens)
        query_starts = inputs.query_starts
        tables = self._to_device(inputs.block_tables, torch.int32)
        lens = self._to_device(inputs.seq_lens, torch.int32)
        if decode_only:  # no prefill rows: the attention layers never read cu_seqlens_q
            prefill_cu_seqlens_q = self.no_prefill
        else:
            prefill_cu_seqlens_q = self._to_device([q - query_starts[d] for q in query_starts[d:]], torch.int32)
        meta = AttentionMetadata(
            slot_mapping=self._to_device(inputs.slot_mapping, torch.int64),
            num_decode_tokens=d,
            decode_block_tables=tables[:d],
            decode_seq_lens=lens[:d],
            prefill_cu_seqlens_q=prefill_cu_seqlens_q,
            prefill_seq_lens=lens[d:],
            prefill_block_tables=tables[d:],
            max_query_len=inputs.max_query_len,
        )
        ids = self._to_device(inputs.input_ids, torch.int64)
        pos = self._to_device(inputs.positions, torch.int64)
        graphs = self.decode_graphs
        with kernels.use_backend(self.kernel_backend):
            if graphs is not None and decode_only and d <= graphs.max_batch_size and adapters is None:
                self.graphed_steps += 1
                return graphs.run(ids, pos, meta)
            if self.decode_stack is not None and decode_only:
                self.stack_steps += 1
                return self.decode_stack.run(ids, pos, meta)
            # steps with LoRA rows run eagerly: their row grouping changes from step to step
            with forward_context(meta), lora_context(adapters):
                return self.model(ids, pos)
