"""Continuous batching: decide, before every step, which sequences compute how many tokens.

Each sequence needs `num_uncomputed_tokens` more tokens computed: a whole or partial prompt (prefill), or just its
last sampled token (decode). One step mixes both under `max_num_batched_tokens`; decodes go first so running
requests keep streaming while long prompts are chunked in behind them. When the KV cache is full, the most recently
admitted running sequence is preempted: its blocks are freed and it is recomputed later (prefix caching usually
finds most of its blocks still intact).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from lmport.engine.block_manager import BlockManager
from lmport.engine.lora import LoRAManager
from lmport.engine.sequence import Request, Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence]  # single-token sequences first, then the multi-token prefill chunks
    num_new_tokens: list[int]
    num_decodes: int
    copies: list[tuple[int, int]]  # copy-on-write block copies to run before the forward pass


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool, lora: LoRAManager | None = None) -> None:
        self.block_manager = block_manager
        self.lora = lora
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        budget = self.max_num_batched_tokens
        chosen: dict[Sequence, int] = {}
        preempted = False

        # Running sequences: decodes first, then prefills still in progress.
        for seq in sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            num_new = self._tokens_to_schedule(seq, budget)
            if num_new == 0:
                continue
            while not self.block_manager.allocate_slots(seq, num_new):
                victim = self._lowest_priority_running(exclude=chosen)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                chosen[seq] = num_new
                budget -= num_new

        # Waiting sequences, in arrival order, unless this step already had to preempt.
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._holds_adapter(seq.request):
                break  # its adapter waits for a free slot; arrival order is kept
            first_time = seq.request.metrics.first_scheduled_time is None
            if not seq.block_table and seq.request.uses_prefix_cache:
                hits = self.block_manager.match_prefix(seq)
                if first_time:
                    seq.num_cached_tokens = hits
            num_new = self._tokens_to_schedule(seq, budget)
            if num_new == 0 or not self.block_manager.allocate_slots(seq, num_new):
                self.block_manager.free(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if first_time:
                seq.request.metrics.first_scheduled_time = time.time()
            chosen[seq] = num_new
            budget -= num_new

        if not chosen:
            return None
        ordered = sorted(chosen, key=lambda s: chosen[s] > 1)
        return ScheduledBatch(seqs=ordered, num_new_tokens=[chosen[s] for s in ordered],
                              num_decodes=sum(1 for s in ordered if chosen[s] == 1),
                              copies=self.block_manager.take_pending_copies())

    def start_forks(self, parent: Sequence, children: list[Sequence]) -> None:
        """Children of an n > 1 request join the batch sharing every block of the freshly prefilled parent."""
        for child in children:
            self.block_manager.fork(parent, child)
            child.status = SequenceStatus.RUNNING
            self.running.append(child)

    def finish(self, seq: Sequence) -> None:
        """Remove seq wherever it is and return its blocks (finished, stopped or aborted)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq)

    def _holds_adapter(self, request: Request) -> bool:
        """A LoRA request takes its adapter's slot when first scheduled and keeps it until it finishes."""
        if request.lora_request is None or request.lora_slot >= 0:
            return True
        assert self.lora is not None, "a LoRA request reached an engine without enable_lora"
        slot = self.lora.acquire(request.lora_request)
        if slot is None:
            return False
        request.lora_slot = slot
        return True

    def release_adapter(self, request: Request) -> None:
        if request.lora_slot >= 0:
            self.lora.release(request.lora_slot)  # type: ignore[union-attr]
            request.lora_slot = -1

    def _tokens_to_schedule(self, seq: Sequence, budget: int) -> int:
        remaining = seq.num_uncomputed_tokens
        if remaining <= budget:
            return remaining
        return budget if self.enable_chunked_prefill else 0

    def _lowest_priority_running(self, exclude: dict[Sequence, int]) -> Sequence:
        for seq in reversed(self.running):
            if seq not in exclude:
                return seq
        raise AssertionError("no sequence left to preempt")  # the running seq itself is never in exclude

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
