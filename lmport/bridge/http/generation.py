"""One generation call driven from the event loop: its prompts go to the service as one streaming call, the delta
chunks come back in order, and the call is cancelled (the engine aborts it, freeing its KV blocks) if the consumer
goes away before it finishes.

Chunks and the outcome arrive on the engine's thread and cross into the event loop through `call_soon_threadsafe`.
A chunk is the service's stream data: `{index (prompt), outputs: [{index, text, token_ids, logprobs?,
finish_reason, stop_reason}], finished, prompt_logprobs?}`; the outcome is its summary `{usage, requests: [{index,
num_cached_tokens, metrics, outputs: [{index, finish_reason, ...}]}]}`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from lmport.bridge.http.metrics import ServerMetrics
from lmport.engine.tool_calls import ToolCalling

OnChunk = Callable[[dict[str, Any]], None]
OnDone = Callable[[Any, BaseException | None], None]


class Backend(Protocol):
    """What the HTTP server needs from the engine side (lmport/bridge/http/backend.py implements it over lmport.bridge.service)."""

    max_model_len: int

    def load(self) -> None: ...
    def sibling(self, engine_options: dict[str, Any]) -> Backend: ...  # another model, sharing the engine side
    def hold(self) -> Callable[[], None]: ...  # keep the engine loaded (reloading it) until release() is called
    def sampling_params(self, fields: dict[str, Any]) -> dict[str, Any]: ...  # validated, every default filled in
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def detokenize(self, token_ids: list[int]) -> str: ...
    def chat_token_ids(self, messages: list[dict[str, Any]], chat_template: str | None,
                       add_generation_prompt: bool, tools: list[dict[str, Any]] | None = None) -> list[int]: ...
    def tool_calling(self, tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
                     chat_template: str | None) -> ToolCalling | None: ...  # validated; None without tools
    def embed(self, inputs: list[list[int]], pooling: str, normalize: bool,
              dimensions: int | None) -> dict[str, Any]: ...  # the worker's EmbedResult
    def submit(self, prompts: list[list[int]], sampling: dict[str, Any], on_chunk: OnChunk, on_done: OnDone,
               lora_request: dict[str, Any] | None = None) -> Callable[[], None]: ...  # returns cancel
    def stats(self) -> dict[str, Any]: ...
    def service_stats(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


@dataclass(slots=True)
class Chunk:
    data: dict[str, Any]
    arrived: float  # monotonic, for inter-token latency


@dataclass(slots=True)
class _Done:
    summary: Any
    error: BaseException | None


_GONE = object()  # queued by the disconnect watcher


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                                 "total_tokens": self.prompt_tokens + self.completion_tokens}
        if self.cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return usage


@dataclass(slots=True)
class Generation:
    """Several prompts with the same sampling fields, submitted to the service as one call."""

    backend: Backend
    metrics: ServerMetrics
    prompts: list[list[int]]
    sampling: dict[str, Any]
    lora_request: dict[str, Any] | None = None
    usage: Usage = field(default_factory=Usage)
    client_gone: bool = False
    _queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    _cancel: Callable[[], None] | None = None
    _finished: bool = False
    _watcher: asyncio.Future[None] | None = None
    _last_token_at: dict[tuple[int, int], float] = field(default_factory=dict)
    _finish_reasons: dict[tuple[int, int], str] = field(default_factory=dict)  # (prompt, completion) -> reason

    async def start(self) -> None:
        """Submit (on a worker thread: the service's admission may block); admission errors (InvalidParams,
        BridgeError) raise here, before anything was sent.

        An error counts as an admission error when it arrives before submit returned, on whatever thread: the
        flag that says so is flipped under a lock on the submitting thread, before the event loop can look at
        what was collected, so an error is either collected here or queued for chunks(), never neither."""
        loop = asyncio.get_running_loop()
        put = self._queue.put_nowait
        lock = threading.Lock()
        submitting = True
        admission: list[BaseException] = []

        def on_chunk(data: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(put, Chunk(data, time.monotonic()))

        def on_done(summary: Any, error: BaseException | None) -> None:
            with lock:
                if submitting and error is not None:
                    admission.append(error)  # refused while submitting: start() raises it
                    return
            loop.call_soon_threadsafe(put, _Done(summary, error))

        def submit() -> Callable[[], None]:
            nonlocal submitting
            try:
                return self.backend.submit(self.prompts, self.sampling, on_chunk, on_done, self.lora_request)
            finally:
                with lock:
                    submitting = False

        self._cancel = await asyncio.to_thread(submit)
        if admission:
            self._finished = True
            raise admission[0]
        self.usage.prompt_tokens = sum(len(p) for p in self.prompts)

    def watch(self, receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        """Stop (and cancel) as soon as the ASGI connection reports a disconnect: a client that went away must not
        keep the engine generating, whether it was streaming or waiting for the whole response."""
        async def watcher() -> None:
            while (await receive())["type"] not in ("http.disconnect", "websocket.disconnect"):
                pass
            self._queue.put_nowait(_GONE)

        self._watcher = asyncio.ensure_future(watcher())

    def cancel(self) -> None:
        """Idempotent; the engine aborts what has not finished and frees its blocks."""
        if not self._finished and self._cancel is not None:
            self._finished = True
            self._cancel()
            unfinished = len(self.prompts) * int(self.sampling.get("n", 1)) - len(self._finish_reasons)
            self.metrics.observe_finished(None, ["abort"] * unfinished)

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The call's chunks in order until it finishes (a completion that already finished is not repeated);
        raises the call's error. Leaving early, or a client disconnect, cancels the call."""
        try:
            while not self._finished:
                item = await self._queue.get()
                if item is _GONE:
                    self.client_gone = True
                    return
                if isinstance(item, _Done):
                    self._finished = True
                    if item.error is not None:
                        raise item.error
                    self._account_summary(item.summary)
                    return
                self._account(item)
                yield item
        finally:
            self.cancel()
            if self._watcher is not None:
                self._watcher.cancel()

    async def collect(self) -> list[dict[str, Any]]:
        """Wait for everything; per prompt, {outputs: [{index, text, token_ids, logprobs, finish_reason,
        stop_reason}], prompt_logprobs} with the deltas concatenated."""
        merged: list[dict[str, Any]] = [{"outputs": {}, "prompt_logprobs": None} for _ in self.prompts]
        async for chunk in self.chunks():
            target = merged[chunk.data["index"]]
            if chunk.data.get("prompt_logprobs") is not None:
                target["prompt_logprobs"] = chunk.data["prompt_logprobs"]
            for out in chunk.data["outputs"]:
                have = target["outputs"].setdefault(out["index"], {"index": out["index"], "text": "", "token_ids": [],
                                                                   "logprobs": None})
                have["text"] += out["text"]
                have["token_ids"].extend(out["token_ids"])
                if out.get("logprobs") is not None:
                    have["logprobs"] = (have["logprobs"] or []) + out["logprobs"]
                have["finish_reason"] = out.get("finish_reason")
                have["stop_reason"] = out.get("stop_reason")
        return [{**m, "outputs": [m["outputs"][i] for i in sorted(m["outputs"])]} for m in merged]

    def _account(self, chunk: Chunk) -> None:
        fresh = []
        for out in chunk.data["outputs"]:
            key = (chunk.data["index"], out["index"])
            if key in self._finish_reasons:
                continue
            fresh.append(out)
            new_tokens = len(out["token_ids"])
            self.usage.completion_tokens += new_tokens
            if new_tokens:
                last = self._last_token_at.get(key)
                if last is not None:
                    self.metrics.observe_itl(chunk.arrived - last, new_tokens)
                self._last_token_at[key] = chunk.arrived
            if out.get("finish_reason"):
                self._finish_reasons[key] = out["finish_reason"]
        chunk.data["outputs"] = fresh

    def _account_summary(self, summary: dict[str, Any]) -> None:
        for request in summary.get("requests", []):
            self.usage.cached_tokens += int(request.get("num_cached_tokens") or 0)
            reasons = [o["finish_reason"] for o in request.get("outputs", []) if o.get("finish_reason")]
            self.metrics.observe_finished(request.get("metrics"), reasons)
