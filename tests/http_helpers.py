"""Servers for the HTTP tests: the real app on uvicorn on a loopback port, over the real service (one model load,
shared by every test module) or over a scripted backend with no model (fast tests of the HTTP layer)."""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx

from lmport.bridge.http.config import load_settings
from lmport.bridge.http.server import RunningServer
from lmport.engine.sampling_params import SamplingParams
from lmport.engine.tool_calls import ToolCalling

# small enough for a shared 2-core machine, big enough for 32 concurrent short requests
TEST_ENGINE = {"model": "smollm2", "dtype": "float32", "max_model_len": 2048, "kv_cache_memory_bytes": 256 << 20}


@functools.cache
def shared_service() -> Any:
    """One service for every test server; it keeps a handle of its own, so the engine outlives each server."""
    from lmport.bridge.service import Service

    service = Service()
    service.llm(**TEST_ENGINE)
    return service


def model_server(**serve_options: Any) -> RunningServer:
    """The real app over the shared service (the bundled model, loaded once per test session)."""
    from lmport.bridge.http.backend import ServiceBackend

    settings = load_settings({"port": 0, "uvicorn_log_level": "warning", **TEST_ENGINE, **serve_options}, environ={})
    return RunningServer(settings, ServiceBackend(settings.engine, service=shared_service())).wait_ready()


def engine_stats(server: RunningServer) -> dict[str, Any]:
    """The counters (/stats) of the engine behind this server."""
    stats = httpx.get(f"{server.url}/stats").json()
    return next(e for e in stats["engines"] if e["refs"] and server.state.backend.ref in e["refs"])


def wait_idle(server: RunningServer, timeout: float = 60.0) -> dict[str, Any]:
    """Stats once nothing runs or waits and every KV block is back in the pool."""
    end = time.monotonic() + timeout
    while True:
        stats = engine_stats(server)
        if stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_blocks_free"] == stats[
                "kv_blocks_total"]:
            return stats
        assert time.monotonic() < end, stats
        time.sleep(0.05)


def parse_sse(lines: Iterable[str]) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) per server-sent event; unnamed events are 'message', as EventSource calls them."""
    events, name = [], "message"
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
            name = "message"
    return events


def fake_server(backend: FakeBackend | None = None, **serve_options: Any) -> tuple[RunningServer, FakeBackend]:
    backend = backend or FakeBackend()
    settings = load_settings({"port": 0, "uvicorn_log_level": "warning", **serve_options}, environ={})
    return RunningServer(settings, backend), backend


class FakeBackend:
    """Tokens are characters; a generation answers 'x' per token at once. load() waits for `loaded` to be set
    (so tests can watch the server while 'loading'). Sampling fields are validated by the real SamplingParams."""

    max_model_len = 64

    def __init__(self, loaded: bool = True) -> None:
        self.loaded = threading.Event()
        if loaded:
            self.loaded.set()
        self.submitted: list[tuple[list[list[int]], dict[str, Any]]] = []
        self.refuse: BaseException | None = None  # submit answers this error at once, as the service's admission does
        self.chat_error: BaseException | None = None  # chat_token_ids raises this
        self.holds = 0  # engine holds taken by requests and not yet released

    def load(self) -> None:
        self.loaded.wait(30)

    def sibling(self, engine_options: dict[str, Any]) -> FakeBackend:
        return type(self)()

    def hold(self) -> Callable[[], None]:
        self.holds += 1

        def release() -> None:
            self.holds -= 1
        return release

    def sampling_params(self, fields: dict[str, Any]) -> dict[str, Any]:
        return SamplingParams.from_dict(fields).to_dict()

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def detokenize(self, token_ids: list[int]) -> str:
        return "".join(chr(t) for t in token_ids)

    def tool_calling(self, tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
                     chat_template: str | None) -> ToolCalling | None:
        return ToolCalling.from_request(tools, tool_choice)

    def chat_token_ids(self, messages: list[dict[str, Any]], chat_template: str | None,
                       add_generation_prompt: bool, tools: list[dict[str, Any]] | None = None) -> list[int]:
        """`role:content;` per message, or `chat_template` rendered by jinja2 as transformers renders one."""
        if self.chat_error is not None:
            raise self.chat_error
        if chat_template is not None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            return self.tokenize(ImmutableSandboxedEnvironment().from_string(chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt))
        return self.tokenize("".join(f"{m['role']}:{m.get('content') or ''};" for m in messages))

    def submit(self, prompts: list[list[int]], sampling: dict[str, Any], on_chunk: Callable[[dict[str, Any]], None],
               on_done: Callable[[Any, BaseException | None], None],
               lora_request: dict[str, Any] | None = None) -> Callable[[], None]:
        self.submitted.append((prompts, sampling))
        if self.refuse is not None:
            on_done(None, self.refuse)
            return lambda: None
        requests = []
        keep = sampling.get("truncate_prompt_tokens")
        for index, prompt in enumerate(prompts):
            prompt = prompt[-keep:] if keep else prompt  # as the engine truncates
            outputs = [{"index": i, "text": "x" * sampling["max_tokens"], "token_ids": [120] * sampling["max_tokens"],
                        "logprobs": None if sampling.get("logprobs") is None else [[_entry(120)]] * sampling[
                            "max_tokens"], "finish_reason": "length", "stop_reason": None}
                       for i in range(sampling["n"])]
            chunk = {"index": index, "outputs": outputs, "finished": True}
            if sampling.get("prompt_logprobs") is not None:  # the first token has nothing before it
                chunk["prompt_logprobs"] = [None] + [[_entry(t)] for t in prompt[1:]]
            on_chunk(chunk)
            requests.append({"index": index, "num_cached_tokens": 0, "metrics": None,
                             "outputs": [{"index": o["index"], "finish_reason": "length"} for o in outputs]})
        on_done({"requests": requests}, None)
        return lambda: None

    def stats(self) -> dict[str, Any]:
        return {"num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0, "prompt_tokens_total": 0}

    def service_stats(self) -> dict[str, Any]:
        return {"service": {}, "engines": []}

    def close(self) -> None:
        self.loaded.set()


def _entry(token_id: int) -> dict[str, Any]:
    """One logprobs entry, the engine's shape: every token is the fake's only candidate."""
    return {"token_id": token_id, "logprob": -1.0, "rank": 1, "decoded_token": chr(token_id)}
