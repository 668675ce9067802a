"""The engine's step: schedule, run the model, sample, turn new tokens into per-request outputs.

Single-threaded by design; lmport.engine.llm.LLM drives it from one background thread and feeds it requests.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from lmport.engine.block_manager import BlockManager
from lmport.engine.config import EngineConfig
from lmport.engine.detokenizer import IncrementalDetokenizer
from lmport.engine.engine_base import EngineBase, Prompt, tokenize_prompt
from lmport.engine.errors import InvalidParams
from lmport.engine.loader import LoadedModel, load_model
from lmport.engine.lora import LoRARequest
from lmport.engine.model_runner import ModelRunner, StepLogits
from lmport.engine.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from lmport.engine.pooling import aborted_embedding, add_chunk, finish_embedding, pooled_value
from lmport.engine.sampler import Sampler, SamplerOutput, SamplingBatch, compute_prompt_logprobs
from lmport.engine.sampling_params import RequestOutputKind, SamplingParams, check_token_ids
from lmport.engine.scheduler import ScheduledBatch, Scheduler
from lmport.engine.sequence import Request, Sequence
from lmport.engine.structured_outputs import GrammarCompiler

logger = logging.getLogger("lmport")

class LLMEngine(EngineBase):
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        loaded = loaded or load_model(config)
        super().__init__(config, loaded)
        self.eos_token_ids = set(loaded.eos_token_ids)
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise InvalidParams("max_num_batched_tokens",
                                f"must be >= max_model_len ({self.max_model_len}) when enable_chunked_prefill is off")
        try:
            self.runner = ModelRunner(loaded, config)
        except BaseException:
            if loaded.tp is not None:  # the other tensor-parallel ranks must not outlive a failed construction
                loaded.tp.close()
            raise
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching,
                                          self.runner.sliding_window)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_chunked_prefill, self.runner.lora)
        self.sampler = Sampler(self.vocab_size, self.eos_token_ids,
                               generator=torch.Generator(device=self.device).manual_seed(config.seed))
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, sorted(self.eos_token_ids))
        self.finish_reasons: Counter[str] = Counter()
        self.max_num_running = 0

    # --- admission ---

    def make_request(self, request_id: str, prompt: Prompt, params: SamplingParams,
                     on_output: Callable[[RequestOutput], None],
                     lora_request: LoRARequest | dict | None = None) -> Request:
        """Tokenize and validate a request (any thread); it joins the batch with add_request (engine thread).
        A lora_request's adapter is read (and checked) here too."""
        lora_request = LoRARequest.of(lora_request)
        if lora_request is not None:
            if self.runner.lora is None:
                raise InvalidParams("lora_request", "this engine serves no LoRA adapters: load it with "
                                                    "enable_lora=True")
            self.runner.lora.load(lora_request)
        text, token_ids = tokenize_prompt(self.tokenizer, prompt)
        if params.truncate_prompt_tokens is not None:
            token_ids = token_ids[-params.truncate_prompt_tokens:]
        if not token_ids:
            raise InvalidParams("prompt", "the prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise InvalidParams("prompt", f"the prompt has {len(token_ids)} tokens; max_model_len is "
                                          f"{self.max_model_len}, which leaves no room for output")
        token_ids = check_token_ids(token_ids, "prompt_token_ids", self.vocab_size)
        params.verify_for_model(self.vocab_size, self.config.max_logprobs, self.max_model_len)
        request = Request(request_id=request_id, prompt=text, prompt_token_ids=token_ids, params=params,
                          on_output=on_output, lora_request=lora_request)
        if params.bad_words:
            request.bad_words_token_ids = params.bad_words_token_ids(self.tokenizer)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        constraint = params.structured_outputs
        if constraint is not None:
            self.grammars.compile(constraint)  # an invalid constraint fails here, before the request joins the batch
        for index in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(params.seed + index)
            detokenizer = IncrementalDetokenizer(self.tokenizer, params, token_ids) if params.detokenize else None
            matcher = self.grammars.matcher(constraint) if constraint is not None else None  # one per completion
            request.seqs.append(Sequence(request=request, token_ids=list(token_ids), num_prompt_tokens=len(token_ids),
                                         index=index, generator=generator, detokenizer=detokenizer, matcher=matcher))
        return request

    @property
    def num_kv_blocks(self) -> int:
        return self.block_manager.num_blocks

    def add_request(self, request: Request) -> None:
        self._admit(request)
        self.scheduler.add(request.seqs[0])

    def abort(self, request_id: str) -> bool:
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        self.counters["requests_aborted"] += 1
        self._finish_request(request)
        return True

    def close(self) -> None:
        self.runner.close()

    # --- the step ---

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> None:
        batch = self.scheduler.schedule()
        if batch is None:
            return
        self.max_num_running = max(self.max_num_running, len(self.scheduler.running))
        self.counters["steps"] += 1
        step_logits = self.runner.run(batch)
        now = time.time()
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.counters["prefill_tokens_computed"] += min(num_new,
                                                                seq.num_prompt_tokens - seq.num_computed_tokens)
            seq.num_computed_tokens += num_new
            self.block_manager.cache_full_blocks(seq)
        self._pool(batch, step_logits)
        self._record_prompt_logprobs(batch, step_logits)
        samplers, rows = self._sampling_rows(batch, step_logits)
        if not samplers:
            return
        logits = step_logits.logits
        if rows != list(range(logits.shape[0])):  # prompt-logprob rows to skip, or forks sharing a row
            logits = logits.index_select(0, torch.tensor(rows, device=self.device))
        sampled = self.sampler(logits, SamplingBatch.from_sequences(samplers))
        touched: dict[str, Request] = {}
        for i, seq in enumerate(samplers):
            self._append_token(seq, sampled, i, now)
            touched[seq.request.request_id] = seq.request
        for request in touched.values():
            if request.finished:
                self._finish_request(request)
            else:
                self._emit(request, finished=False)

    def _pool(self, batch: ScheduledBatch, step_logits: StepLogits) -> None:
        """Embed requests: add each chunk's share; one whose prompt is now computed finishes with its embedding."""
        for i, part in step_logits.pooled.items():
            seq = batch.seqs[i]
            add_chunk(seq.request, part, seq.num_computed_tokens - batch.num_new_tokens[i])
            if seq.num_computed_tokens == seq.num_prompt_tokens:
                seq.finish_reason = "stop"
                self.scheduler.finish(seq)
                self.counters["embeddings_total"] += 1
                self._finish_request(seq.request)

    def _sampling_rows(self, batch: ScheduledBatch, step_logits: StepLogits) -> tuple[list[Sequence], list[int]]:
        """Sequences sampling this step and their logits rows; an n > 1 parent that just finished its prompt
        forks here, and every child draws its first token from the parent's row."""
        seqs: list[Sequence] = []
        rows: list[int] = []
        for seq, row in zip(batch.seqs, step_logits.sample_rows):
            if row < 0 or seq.is_finished:
                continue
            seqs.append(seq)
            rows.append(row)
            request = seq.request
            if request.params.n > 1 and not request.forked:
                request.forked = True
                children = request.seqs[1:]
                self.scheduler.start_forks(seq, children)
                seqs.extend(children)
                rows.extend([row] * len(children))
        return seqs, rows

    def _append_token(self, seq: Sequence, sampled: SamplerOutput, i: int, now: float) -> None:
        token_id = sampled.token_ids[i]
        params = seq.request.params
        seq.token_ids.append(token_id)
        self.counters["generation_tokens_total"] += 1
        metrics = seq.request.metrics
        metrics.first_token_time = metrics.first_token_time or now
        metrics.last_token_time = now
        metrics.num_generation_tokens += 1
        if params.logprobs is not None:
            position = self._position_logprobs(sampled.logprob_token_ids[i], sampled.logprob_values[i],
                                               sampled.logprob_ranks[i])
            seq.logprobs.append(position)
            seq.cumulative_logprob += position[token_id].logprob
        num_out = seq.num_output_tokens
        is_stop_token = bool(params.stop_token_ids) and token_id in params.stop_token_ids
        ends_on_token = num_out >= params.min_tokens and (
            (token_id in self.eos_token_ids and not params.ignore_eos) or is_stop_token)
        stop_string = None
        if seq.detokenizer is not None:
            stop_string = seq.detokenizer.update([token_id], stop_terminated=ends_on_token)
        if ends_on_token:
            seq.finish_reason = "stop"
            if is_stop_token:
                seq.stop_reason = token_id
        elif stop_string is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop_string
        if seq.finish_reason is None and (num_out >= params.max_tokens or seq.num_tokens >= self.max_model_len):
            seq.finish_reason = "length"
        if seq.matcher is not None:
            self._finish_by_grammar(seq, token_id)
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)

    @staticmethod
    def _finish_by_grammar(seq: Sequence, token_id: int) -> None:
        """A structured output ends with 'stop' exactly when its grammar is complete (even under ignore_eos); cut
        short by anything else (max_tokens, a stop string), it reports 'length' and is never passed off as valid."""
        matcher = seq.matcher
        accepted = matcher.accept_token(token_id)
        if accepted and matcher.is_terminated():
            seq.finish_reason = "stop"
        elif not accepted:  # only when other processors banned every token the grammar allows
            logger.warning("request %s: token %d is outside its structured-output grammar; stopping it",
                           seq.request.request_id, token_id)
            seq.finish_reason, seq.stop_reason = "length", None
        elif seq.finish_reason == "stop":
            seq.finish_reason, seq.stop_reason = "length", None

    def _record_prompt_logprobs(self, batch: ScheduledBatch, step_logits: StepLogits) -> None:
        for i, (first_row, count) in step_logits.prompt_rows.items():
            seq = batch.seqs[i]
            collected = seq.request.prompt_logprobs
            start = seq.num_computed_tokens - batch.num_new_tokens[i]  # position of the chunk's first token
            if collected is None or len(collected) != start + 1:  # a recomputation after preemption: already have it
                continue
            targets = seq.token_ids[start + 1:start + 1 + count]
            token_ids, values, ranks = compute_prompt_logprobs(step_logits.logits[first_row:first_row + count],
                                                               targets, seq.request.params.prompt_logprobs)
            collected.extend(self._position_logprobs(t, v, r) for t, v, r in zip(token_ids, values, ranks))

    def _position_logprobs(self, token_ids: list[int], values: list[float], ranks: list[int]) -> PositionLogprobs:
        return {t: Logprob(v, r, self._decode_token(t)) for t, v, r in zip(token_ids, values, ranks)}

    def _decode_token(self, token_id: int) -> str:
        return _decode_single(self.tokenizer, token_id)

    # --- outputs ---

    def _finish_request(self, request: Request) -> None:
        self.requests.pop(request.request_id, None)
        self.scheduler.release_adapter(request)
        request.metrics.finished_time = time.time()
        self.counters["requests_finished"] += 1
        for seq in request.seqs:
            self.finish_reasons[seq.finish_reason or "abort"] += 1
        self._emit(request, finished=True)

    def _emit(self, request: Request, finished: bool) -> None:
        if request.pooling is not None:  # one output, when it is done (or aborted)
            aborted = request.seqs[0].finish_reason == "abort"
            request.on_output(aborted_embedding(request) if aborted
                              else finish_embedding(request, pooled_value(request)))
            return
        kind = request.params.output_kind
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return
        delta = kind is RequestOutputKind.DELTA
        outputs = []
        for seq in request.seqs:
            if seq.num_output_tokens == 0 and not seq.is_finished:
                continue  # a child that has not forked yet
            completion = self._completion(seq, delta)
            if delta and not completion.token_ids and not completion.text and not seq.is_finished:
                continue
            outputs.append(completion)
        prompt_logprobs = request.prompt_logprobs if (not delta or not request.emitted) else None
        request.emitted = True
        request.on_output(RequestOutput(
            request_id=request.request_id, prompt=request.prompt, prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=prompt_logprobs, outputs=outputs, finished=finished, metrics=request.metrics,
            num_cached_tokens=request.seqs[0].num_cached_tokens))

    def _completion(self, seq: Sequence, delta: bool) -> CompletionOutput:
        start = seq.sent_tokens if delta else 0
        text = seq.detokenizer.get_next_output_text(seq.is_finished, delta) if seq.detokenizer is not None else ""
        completion = CompletionOutput(
            index=seq.index, text=text, token_ids=seq.output_token_ids[start:],
            cumulative_logprob=seq.cumulative_logprob if seq.request.params.logprobs is not None else None,
            logprobs=seq.logprobs[start:] if seq.request.params.logprobs is not None else None,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
        seq.sent_tokens = seq.num_output_tokens
        return completion

    # --- introspection ---

    def stats(self) -> dict[str, Any]:
        bm = self.block_manager
        return {
            **{k: self.counters[k] for k in ("requests_total", "requests_finished", "requests_aborted", "steps",
                                             "prompt_tokens_total", "prefill_tokens_computed",
                                             "generation_tokens_total", "embeddings_total")},
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "max_num_running": self.max_num_running,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": bm.prefix_cache_queries,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_free": bm.num_free_blocks,
            "kv_cache_usage": bm.usage,
            "finish_reasons": dict(self.finish_reasons),
            "cuda_graph_steps": self.runner.graphed_steps,
            "cpu_decode_stack_steps": self.runner.stack_steps,
        }


@functools.lru_cache(maxsize=1 << 16)
def _decode_single(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])
