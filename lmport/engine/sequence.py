"""Requests and their sequences: the state the scheduler, block manager and model runner share.

A Request holds what the user asked for; each of its `n` completions is a Sequence. Only the first sequence is
prefilled; the others fork from it when the prompt is done and share its KV blocks.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lmport.engine.outputs import PositionLogprobs, RequestMetrics, RequestOutput

if TYPE_CHECKING:
    import xgrammar

    from lmport.engine.lora import LoRARequest

    from lmport.engine.detokenizer import IncrementalDetokenizer
    from lmport.engine.pooling import PoolingParams
    from lmport.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


@dataclass(slots=True, eq=False)
class Sequence:
    request: Request
    token_ids: list[int]  # prompt followed by the output so far
    num_prompt_tokens: int
    index: int = 0  # which of the request's n completions
    generator: torch.Generator | None = None
    detokenizer: IncrementalDetokenizer | None = None
    matcher: xgrammar.GrammarMatcher | None = None  # this completion's own structured-output state
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)  # block_manager.FREED_BLOCK: fell out of the window
    block_hashes: list[int] = field(default_factory=list)  # prefix-cache hash chain of the full, computed blocks
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first scheduling
    cumulative_logprob: float = 0.0
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_tokens: int = 0  # outputs already delivered (for delta outputs)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prefix_cache_salt(self) -> int | None:
        """Seeds the prefix-cache hash chain: K/V computed under one LoRA adapter are never served to another."""
        lora = self.request.lora_request
        return None if lora is None else lora.lora_int_id

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    on_output: Callable[[RequestOutput], None]
    arrival_time: float = field(default_factory=time.time)
    seqs: list[Sequence] = field(default_factory=list)  # all n exist from the start; seqs[1:] wait for the fork
    forked: bool = False
    emitted: bool = False  # an output was delivered already (prompt logprobs go out once in delta mode)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    bad_words_token_ids: list[list[int]] | None = None
    pooling: PoolingParams | None = None  # an embed request: prefill only, pooled instead of sampled
    lora_request: LoRARequest | None = None
    lora_slot: int = -1  # the adapter's slot while the request holds one (lmport.engine.lora), else -1
    pooled: torch.Tensor | None = field(default=None, init=False, repr=False)  # running pooled value (float32)
    # The prompt's distinct token ids on the sampling device, for repetition_penalty (SamplingBatch fills it once).
    distinct_prompt_token_ids: torch.Tensor | None = field(default=None, init=False, repr=False)
    metrics: RequestMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = RequestMetrics(arrival_time=self.arrival_time, num_prompt_tokens=len(self.prompt_token_ids))

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @property
    def uses_prefix_cache(self) -> bool:
        """Cached blocks skip computing their positions: fine unless their rows are needed (prompt logprobs, and
        pooling over more than the last token)."""
        if self.pooling is not None:
            return self.pooling.pooling == "last"
        return self.params.prompt_logprobs is None
