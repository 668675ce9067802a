"""The engine of an encoder (embedding) model: embed requests in, one pooled vector each out.

An encoder has no decode phase and attends over each input as a whole, so there is nothing to keep between steps: no
paged KV cache, no chunked prefill, no preemption. Each step is one plain padded forward over a batch of waiting
inputs (similar lengths together, under max_num_seqs and max_num_batched_tokens counted with padding). It has the
interface LLM drives LLMEngine through, so the threading, streams and abort work the same.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from lmport import kernels
from lmport.engine.config import EngineConfig
from lmport.engine.engine_base import EngineBase, Prompt
from lmport.engine.errors import InvalidParams
from lmport.engine.llm_engine import LLMEngine
from lmport.engine.loader import LoadedModel, load_model
from lmport.engine.pooling import aborted_embedding, finish_embedding, pool_padded
from lmport.engine.sampling_params import SamplingParams
from lmport.engine.sequence import Request

MAX_PADDING = 0.25  # most pad tokens a batch carries, as a fraction of its real tokens


class EncoderEngine(EngineBase):
    num_kv_blocks = 0  # encoders run without a KV cache

    def __init__(self, config: EngineConfig, loaded: LoadedModel) -> None:
        super().__init__(config, loaded)
        self.model = loaded.model
        self.pad_token_id = getattr(loaded.hf_config, "pad_token_id", None) or 0
        self.kernel_backend = config.kernel_backend
        self.waiting: deque[Request] = deque()
        self.max_batch = 0

    def make_request(self, request_id: str, prompt: Prompt, params: SamplingParams,
                     on_output: Callable[[Any], None], lora_request: Any = None) -> Request:
        raise InvalidParams("model", f"{self.model_path} is an encoder (embedding) model: it serves embed, not "
                                     "generate or chat")

    def add_request(self, request: Request) -> None:
        self._admit(request)
        self.waiting.append(request)

    def abort(self, request_id: str) -> bool:
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        self.waiting.remove(request)  # a request is only ever waiting: a step runs it to completion
        self.counters["requests_aborted"] += 1
        request.on_output(aborted_embedding(request))
        return True

    def has_work(self) -> bool:
        return bool(self.waiting)

    def _next_batch(self) -> list[Request]:
        """Among the oldest max_num_seqs waiting inputs, the shortest ones of similar length: the batch grows while
        it fits max_num_batched_tokens counted with padding and padding stays under MAX_PADDING of its tokens
        (compute is spent on pad tokens too). Every step takes at least one of that window, so none waits more
        than max_num_seqs steps."""
        window = sorted(list(self.waiting)[:self.config.max_num_seqs], key=lambda r: len(r.prompt_token_ids))
        batch, real = window[:1], len(window[0].prompt_token_ids) if window else 0
        for request in window[1:]:
            length = len(request.prompt_token_ids)  # the longest so far: the window is sorted
            padded = (len(batch) + 1) * length
            if padded > self.config.max_num_batched_tokens or padded > (1 + MAX_PADDING) * (real + length):
                break
            batch.append(request)
            real += length
        return batch

    @torch.inference_mode()
    def step(self) -> None:
        batch = self._next_batch()
        if not batch:
            return
        now = time.time()
        for request in batch:
            self.waiting.remove(request)
            request.metrics.first_scheduled_time = now
        length = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.int64)
        mask = torch.zeros((len(batch), length), dtype=torch.int64)
        for row, request in enumerate(batch):
            ids[row, :len(request.prompt_token_ids)] = torch.tensor(request.prompt_token_ids)
            mask[row, :len(request.prompt_token_ids)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        with kernels.use_backend(self.kernel_backend):
            hidden = self.model(ids, mask)
        poolings = {r.pooling.pooling for r in batch if r.pooling is not None}
        pooled = {pooling: pool_padded(hidden, mask, pooling) for pooling in poolings}
        self.counters["steps"] += 1
        self.max_batch = max(self.max_batch, len(batch))
        finished = time.time()
        for row, request in enumerate(batch):
            assert request.pooling is not None
            self.requests.pop(request.request_id, None)
            request.metrics.finished_time = finished
            self.counters["requests_finished"] += 1
            self.counters["embeddings_total"] += 1
            request.on_output(finish_embedding(request, pooled[request.pooling.pooling][row]))

    def stats(self) -> dict[str, Any]:
        return {
            **{k: self.counters[k] for k in ("requests_total", "requests_finished", "requests_aborted", "steps",
                                             "prompt_tokens_total", "embeddings_total")},
            "num_running": 0,
            "num_waiting": len(self.waiting),
            "max_num_running": self.max_batch,
            "kv_blocks_total": 0,
        }


def create_engine(config: EngineConfig) -> LLMEngine | EncoderEngine:
    """Load the model and build the engine that serves it: the KV-cache engine for decoders, this one for encoders."""
    loaded = load_model(config)
    return EncoderEngine(config, loaded) if loaded.is_encoder else LLMEngine(config, loaded)
