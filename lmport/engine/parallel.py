"""Tensor parallelism on CPU over torch.distributed's gloo backend: the ranks' process group, the step broadcast,
and sharding a loaded model.

Rank 0 is the engine (scheduler, sampler, logits); ranks 1..N-1 run lmport.engine.tp_worker.run_rank. Each decoder layer is
split Megatron-style: q|k|v and gate|up by output columns (whole heads, KV heads included), o_proj and down_proj by
input columns, their partial outputs summed by an all-reduce. The embedding, the norms and lm_head stay replicated
(simplest; they are a small share of a decoder's weights), so every rank ends a forward with the full hidden states
and only rank 0 computes logits. Each rank's KV cache holds its own heads.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from transformers import PretrainedConfig

from lmport.engine.errors import InvalidParams, Unsupported
from lmport.engine.forward_context import StepInputs
from lmport.engine.models.granite import GraniteForCausalLM
from lmport.engine.models.layers import Linear
from lmport.engine.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from lmport.engine.models.qwen3 import Qwen3ForCausalLM

# Model classes whose layers are all LlamaAttention (no whole-projection q/k norm) + LlamaMLP: what shard_model knows.
SHARDABLE = (LlamaForCausalLM, Qwen3ForCausalLM, GraniteForCausalLM)
SHARDABLE_NAMES = "Llama, Mistral, Qwen2, Phi-3, Qwen3, Granite"
# Ranks other than 0 wait in a broadcast for as long as the engine idles: no collective timeout in practice. A dead
# peer still fails a collective at once (its socket closes).
COLLECTIVE_TIMEOUT = datetime.timedelta(days=365)
LOAD_TIMEOUT_S = 1800.0  # a rank loading its shard (every rank reads the whole checkpoint)
_HEADER_WORDS = 8  # int64 header of a step: [1, tokens, seqs, decodes, table width, copies, 0, 0]; all 0 = stop


def check_tensor_parallel(model_cls: type[nn.Module], hf_config: PretrainedConfig, size: int,
                          device: torch.device) -> None:
    """Refuse, before any rank starts, a model that cannot be split `size` ways (or a device gloo does not serve)."""
    if device.type != "cpu":
        raise Unsupported("tensor_parallel_size", f"tensor parallelism runs on CPU only (gloo), not on {device}; "
                                                  "pass device='cpu'")
    if model_cls not in SHARDABLE:
        raise Unsupported("tensor_parallel_size", f"{model_cls.__name__} cannot be sharded yet; tensor "
                          f"parallelism supports {SHARDABLE_NAMES} (Llama-architecture) models")
    counts = {"num_attention_heads": hf_config.num_attention_heads,
              "num_key_value_heads": hf_config.num_key_value_heads,
              "intermediate_size": hf_config.intermediate_size}
    for name, count in counts.items():
        if count % size:
            raise InvalidParams("tensor_parallel_size", f"must divide the model's {name} ({count}); got {size} "
                                "(heads and MLP channels are split evenly across ranks)")


def threads_per_rank(size: int) -> int:
    """Each rank's share of this machine's cores: ranks that each used every core would only contend."""
    return max(1, len(os.sched_getaffinity(0)) // size)


class RowParallel(nn.Module):
    """A projection whose input features are split across ranks: each rank's product is a partial sum of the full
    output, so the ranks all-reduce it. Only rank 0 keeps a bias (it must be added once)."""

    def __init__(self, linear: Linear, group: TensorParallelGroup) -> None:
        super().__init__()
        self.linear = linear
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(self.linear(x))


def _split(x: torch.Tensor, rank: int, size: int, dim: int = 0) -> torch.Tensor:
    return x.chunk(size, dim)[rank].contiguous().clone()  # a copy, so the full tensor is freed


def _shard_columns(linear: Linear, rank: int, size: int) -> None:
    """Keep this rank's 1/size of each fused part's output rows (q, k, v or gate, up): whole heads, since every
    part's size is a multiple of size * head_dim once the head counts divide."""
    parts = list(zip(linear.shard_offsets, linear.output_sizes))
    linear.weight.data = torch.cat([_split(linear.weight.data[o:o + n], rank, size) for o, n in parts])
    if linear.bias is not None:
        linear.bias.data = torch.cat([_split(linear.bias.data[o:o + n], rank, size) for o, n in parts])
    linear.output_sizes = [n // size for n in linear.output_sizes]
    linear.shard_offsets = [sum(linear.output_sizes[:i]) for i in range(len(linear.output_sizes))]


def _shard_rows(linear: Linear, group: TensorParallelGroup) -> RowParallel:
    linear.weight.data = _split(linear.weight.data, group.rank, group.world_size, dim=1)
    linear.input_size //= group.world_size
    if linear.bias is not None and group.rank != 0:
        linear.bias = None
    return RowParallel(linear, group)


def shard_model(model: nn.Module, group: TensorParallelGroup) -> None:
    """Cut a loaded model (see check_tensor_parallel) down to this rank's shard, in place; before quantization or
    weight packing, which then work on the shard."""
    rank, size = group.rank, group.world_size
    for module in list(model.modules()):
        if isinstance(module, LlamaAttention):
            if module.qk_norm == "projection":  # one norm over every head's q: would need the other ranks' heads
                raise Unsupported("tensor_parallel_size", f"q/k norms over the whole projection cannot be "
                                  f"sharded; supported: {SHARDABLE_NAMES}")
            _shard_columns(module.qkv_proj, rank, size)
            module.o_proj = _shard_rows(module.o_proj, group)
            module.q_size //= size
            module.kv_size //= size
            module.attn.num_heads //= size
            module.attn.num_kv_heads //= size
        elif isinstance(module, LlamaMLP):
            _shard_columns(module.gate_up_proj, rank, size)
            module.down_proj = _shard_rows(module.down_proj, group)


class RankProcess(Protocol):
    """What rank 0 needs of another rank: a subprocess.Popen (the mp executor), or a Ray actor's handle shaped like
    one (lmport.engine.ray_executor.RayRank)."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


class TensorParallelGroup:
    """One engine's ranks: a gloo process group (over a TCPStore rendezvous on loopback) and, on rank 0, the other
    ranks' processes (started by lmport.engine.tp_worker.launch) and what to run once they are stopped (on_close:
    the Ray executor's cleanup)."""

    def __init__(self, store: dist.TCPStore, rank: int, world_size: int, procs: list[RankProcess] | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.pg = dist.ProcessGroupGloo(store, rank, world_size, COLLECTIVE_TIMEOUT)
        self.procs = procs or []
        self.on_close = on_close
        self.serving = False  # rank 0: every rank is ready and no collective is left half-done
        self.closed = False

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.pg.allreduce([x]).wait()
        return x

    # --- rank 0 ---

    def wait_ready(self, num_blocks: int) -> None:
        """Tell the other ranks how many KV blocks to allocate, then wait until each is ready to serve steps; a rank
        that fails to load (or dies) fails the engine's construction with its error."""
        self.store.set("num_blocks", str(num_blocks))
        pending = set(range(1, self.world_size))
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while pending:
            for rank in sorted(pending):
                if self.store.check([f"error/{rank}"]):
                    error = self.store.get(f"error/{rank}").decode()
                    raise RuntimeError(f"tensor-parallel rank {rank} failed: {error}")
                if self.store.check([f"ready/{rank}"]):
                    pending.discard(rank)
            dead = [(i + 1, p.returncode) for i, p in enumerate(self.procs) if p.poll() is not None]
            if dead:
                raise RuntimeError(f"tensor-parallel rank {dead[0][0]} exited (code {dead[0][1]}) before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel ranks {sorted(pending)} not ready after {LOAD_TIMEOUT_S:.0f} s")
            time.sleep(0.02)
        self.serving = True

    @contextlib.contextmanager
    def step(self, inputs: StepInputs) -> Iterator[None]:
        """Send one step's inputs to the other ranks for the forward run inside this context. A forward that fails
        here may leave them inside a collective: close() then kills them instead of asking them to stop."""
        self.serving = False
        self._broadcast_header([1, len(inputs.input_ids), len(inputs.seq_lens), inputs.num_decodes,
                                len(inputs.block_tables[0]), len(inputs.copies)])
        flat = [*inputs.input_ids, *inputs.positions, *inputs.slot_mapping, *inputs.seq_lens, *inputs.query_starts,
                *(b for table in inputs.block_tables for b in table), *(s for s, _ in inputs.copies),
                *(d for _, d in inputs.copies)]
        self.pg.broadcast(torch.tensor(flat, dtype=torch.int64), 0).wait()
        yield
        self.serving = True

    def close(self) -> None:
        """Stop the other ranks: asked to when every one is idle, killed otherwise (or when they do not exit)."""
        if self.closed or self.rank != 0:
            return
        self.closed = True
        if self.serving and all(p.poll() is None for p in self.procs):
            with contextlib.suppress(RuntimeError):  # a rank that died meanwhile cannot hear it
                self._broadcast_header([])
        try:
            for proc in self.procs:
                try:
                    proc.wait(5 if self.serving else 0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            if self.on_close is not None:
                self.on_close()

    def _broadcast_header(self, words: list[int]) -> None:
        header = torch.zeros(_HEADER_WORDS, dtype=torch.int64)
        header[:len(words)] = torch.tensor(words, dtype=torch.int64)
        self.pg.broadcast(header, 0).wait()

    # --- the other ranks ---

    def receive_step(self) -> StepInputs | None:
        """The next step's inputs from rank 0, or None when it asks this rank to stop."""
        header = torch.zeros(_HEADER_WORDS, dtype=torch.int64)
        self.pg.broadcast(header, 0).wait()
        op, num_tokens, num_seqs, num_decodes, width, num_copies = header.tolist()[:6]
        if op == 0:
            return None
        sizes = [num_tokens, num_tokens, num_tokens, num_seqs, num_seqs + 1, num_seqs * width, num_copies, num_copies]
        payload = torch.empty(sum(sizes), dtype=torch.int64)
        self.pg.broadcast(payload, 0).wait()
        values, parts, start = payload.tolist(), [], 0
        for n in sizes:
            parts.append(values[start:start + n])
            start += n
        ids, positions, slots, seq_lens, query_starts, tables, src, dst = parts
        return StepInputs(input_ids=ids, positions=positions, slot_mapping=slots, seq_lens=seq_lens,
                          query_starts=query_starts, num_decodes=num_decodes,
                          block_tables=[tables[i * width:(i + 1) * width] for i in range(num_seqs)],
                          copies=list(zip(src, dst)))
