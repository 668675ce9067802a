"""The server's shared state and the admission steps every generation endpoint takes in the same order:
authenticate -> model known -> engine ready (and held: loaded again if keep_alive unloaded it) -> prompts tokenized
(and truncated) -> prompts fit (max_tokens settled) -> sampling fields valid -> rate limit -> submit.

`route()` picks the request's model and answers a copy of the state bound to it: from there on `state.backend` is
that model's, so every admission step and reply shape works unchanged whichever model the request named."""

from __future__ import annotations

import asyncio
import copy
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from starlette.requests import HTTPConnection

from lmport.bridge.http.auth import KeyChecker
from lmport.bridge.http.config import Settings
from lmport.bridge.http.errors import (
    APIError,
    bad_request,
    from_engine_error,
    model_not_found,
    not_ready,
    rate_limited,
    too_large,
)
from lmport.bridge.http.generation import Backend, Generation
from lmport.bridge.http.holds import until_response_ends
from lmport.bridge.http.metrics import ServerMetrics
from lmport.bridge.http.ratelimit import RateLimiter
from lmport.bridge.http.served import ServedModel
from lmport.bridge.protocol import BridgeError
from lmport.engine.errors import LMPortError
from lmport.engine.tool_calls import ToolCalling


# what a chat template raises when it cannot render the messages it was given (jinja's own errors, its
# raise_exception(), Python errors inside an expression, transformers' "no chat template")
TEMPLATE_ERRORS = (TemplateError, ValueError, TypeError, ArithmeticError)


@dataclass(slots=True)
class Admitted:
    """A submitted generation and what it reserved from the rate limiter (refunded down to its usage)."""
    generation: Generation
    identity: str
    reserved_tokens: int
    request_id: str
    created: int
    renames: dict[str, str]  # service field names -> the request's, for errors that arrive while it runs


class ServerState:
    def __init__(self, settings: Settings, backend: Backend) -> None:
        """`backend` serves the first model; the others get siblings of it (handles on the same service)."""
        self.settings = settings
        self.models = [ServedModel(names, root, backend if i == 0 else backend.sibling(settings.engine_for(root)))
                       for i, (names, root) in enumerate(settings.served)]
        self.served = self.models[0]  # the model this state answers for: the default one; route() rebinds it
        self.by_name = {name: served for served in self.models for name in served.names}
        self.model_names = settings.model_names
        self.adapters = settings.lora_requests  # served LoRA adapter name -> lora_request (on the first model)
        self.keys = KeyChecker(settings.serve.api_key)
        self.limiter = RateLimiter(settings.serve.rate_limit_rpm, settings.serve.rate_limit_tpm)
        self.metrics = ServerMetrics(self.model_names[0], self.engine_stats)
        self.started = time.time()

    @property
    def backend(self) -> Backend:
        return self.served.backend

    @property
    def ready(self) -> bool:
        """Every served model has loaded (once: keep_alive may have unloaded it since)."""
        return all(served.ready for served in self.models)

    @property
    def load_error(self) -> str | None:
        errors = [f"{served.root}: {served.load_error}" if len(self.models) > 1 else served.load_error
                  for served in self.models if served.load_error is not None]
        return "; ".join(errors) if errors else None

    # --- lifecycle ---

    def start_loading(self) -> None:
        """Load the models on a thread, one after the other (the service serializes loads anyway), so /health
        answers 503 (not a refused connection) meanwhile."""
        def load() -> None:
            for served in self.models:
                served.load()

        threading.Thread(target=load, name="lmport-load", daemon=True).start()

    def engine_stats(self) -> dict[str, Any] | None:
        return self.served.stats()

    async def listing(self) -> list[dict[str, Any]]:
        """Every served model's /v1/models entries (reading whether each is loaded asks the service: a thread)."""
        return await asyncio.to_thread(lambda: [entry for served in self.models
                                                for entry in served.describe(int(self.started))])

    def close(self) -> None:
        """Release every model's handle; the first backend last, as it may own the service the others share."""
        for served in reversed(self.models):
            served.backend.close()

    # --- admission ---

    def identity(self, conn: HTTPConnection) -> str:
        return self.keys.identity(conn.headers, conn.client.host if conn.client else None,
                                  conn.query_params.get("api_key") if conn.scope["type"] == "websocket" else None)

    def require_ready(self) -> None:
        """503 unless this state's model has loaded (its first load; a reload is route()'s to wait for)."""
        if self.served.load_error is not None:
            raise APIError(503, f"The model failed to load: {self.served.load_error}", type="service_unavailable",
                           code="model_load_failed")
        if not self.served.ready:
            raise not_ready()

    async def route(self, requested: str | None) -> tuple[str, ServerState]:
        """The request's model: (the name to report, this state bound to that model's engine), once the model is
        ready and held for the rest of the request (loaded again first if keep_alive unloaded it, so the request
        waits for the load; refused with the numbers when the memory budget has no room). A LoRA adapter's name
        routes to the first model, its base."""
        name = self.check_model(requested)
        view = copy.copy(self)
        view.served = self.by_name.get(name, self.models[0])
        view.require_ready()
        try:
            release = await asyncio.to_thread(view.backend.hold)
        except Exception as exc:  # noqa: BLE001 — memory_budget_exceeded (503), or the reload failed
            raise from_engine_error(exc) from None
        until_response_ends(release)
        return name, view

    def check_model(self, requested: str | None) -> str:
        """The name to report in responses (the base model's or a served adapter's); 404 for any other."""
        if requested is None or requested in self.model_names or requested in self.adapters:
            return self.model_names[0] if requested is None else requested
        raise model_not_found(requested, self.model_names + list(self.adapters))

    def sampling(self, fields: dict[str, Any], renames: dict[str, str] | None = None) -> dict[str, Any]:
        try:
            return self.backend.sampling_params(fields)
        except Exception as exc:  # noqa: BLE001 — every validation failure becomes a 400 naming the field
            raise from_engine_error(exc, renames) from None

    async def prompt_ids(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """Every prompt as token ids (texts tokenized), in one trip to a worker thread for the whole batch."""
        if all(not isinstance(p, str) for p in prompts):
            return [list(p) for p in prompts]
        return await asyncio.to_thread(lambda: [self.backend.tokenize(p) if isinstance(p, str) else list(p)
                                                for p in prompts])

    def tool_calling(self, tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
                     chat_template: str | None) -> ToolCalling | None:
        """The request's validated tools and tool_choice (a 400 naming e.g. `tools[0].function.name`)."""
        try:
            return self.backend.tool_calling(tools, tool_choice, chat_template)
        except LMPortError as exc:
            raise from_engine_error(exc) from None

    async def chat_prompt(self, messages: list[dict[str, Any]], chat_template: str | None,
                          add_generation_prompt: bool, tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The chat's prompt token ids. A template that cannot render these messages is the caller's input: 400
        naming `chat_template` when the request gave one, else `messages`; the service's and engine's errors
        (shutting_down, not_found, invalid_params) map as they do everywhere, anything else is a 500."""
        try:
            return await asyncio.to_thread(self.backend.chat_token_ids, messages, chat_template,
                                           add_generation_prompt, tools)
        except (LMPortError, BridgeError) as exc:
            raise from_engine_error(exc, {"prompts": "messages"}) from None
        except TEMPLATE_ERRORS as exc:
            param = "messages" if chat_template is None else "chat_template"
            raise bad_request(param, f"the chat template failed on these messages: {type(exc).__name__}: "
                                     f"{exc}") from None
        except Exception as exc:  # noqa: BLE001 — a bug: logged, answered as a 500 in the API's error shape
            raise from_engine_error(exc) from None

    def fit(self, prompts: list[list[int]], fields: dict[str, Any], prompt_param: str,
            max_tokens_param: str) -> dict[str, Any]:
        """The request's sampling fields with max_tokens settled: 413 for a prompt that cannot fit; 400 when prompt +
        max_tokens exceeds max_model_len (vLLM's rule); without max_tokens, generation may run to the end of the
        context. It takes the fields as the request gave them, before validation, so that validation sees the
        max_tokens the request will run with (not SamplingParams' default 16 beside a larger min_tokens)."""
        limit = self.backend.max_model_len
        longest = max(len(p) for p in prompts)
        if longest >= limit:
            raise too_large(prompt_param, f"This model's maximum context length is {limit} tokens; the prompt has "
                                          f"{longest} tokens, which leaves no room for output.")
        max_tokens = fields.get("max_tokens")
        if max_tokens is None:
            return {**fields, "max_tokens": limit - longest}
        if longest + max_tokens > limit:  # a max_tokens below 1 passes here and is refused by validation
            raise bad_request(max_tokens_param, f"This model's maximum context length is {limit} tokens; the prompt "
                                                f"has {longest} tokens and {max_tokens_param} asks for "
                                                f"{max_tokens}, {longest + max_tokens} in all.")
        return fields

    def charge(self, identity: str, cost: int) -> None:
        """Take `cost` tokens from the caller's rate limit: 429 with Retry-After when over."""
        decision = self.limiter.acquire(identity, cost)
        if not decision.allowed:
            raise _rate_error(decision.limit, decision.retry_after_s)

    async def admit(self, identity: str, prompts: list[list[int]], sampling: dict[str, Any], prefix: str,
                    renames: dict[str, str] | None = None, model: str | None = None) -> Admitted:
        """Charge the rate limiter (429 with Retry-After when over), then submit every prompt to the engine (under
        the LoRA adapter `model` names, if it names one)."""
        cost = sum(len(p) for p in prompts) + sampling["max_tokens"] * sampling.get("n", 1) * len(prompts)
        self.charge(identity, cost)
        generation = Generation(self.backend, self.metrics, prompts, sampling, self.adapters.get(model or ""))
        try:
            await generation.start()
        except Exception as exc:  # noqa: BLE001 — admission errors (bad token ids, ...) answer 4xx
            self.limiter.refund(identity, cost)
            raise from_engine_error(exc, renames) from None
        return Admitted(generation, identity, cost, f"{prefix}-{uuid.uuid4().hex}", int(time.time()), renames or {})

    def release(self, admitted: Admitted) -> None:
        usage = admitted.generation.usage
        self.limiter.refund(admitted.identity, admitted.reserved_tokens - usage.prompt_tokens - usage.completion_tokens)


def truncate(prompts: list[list[int]], fields: dict[str, Any]) -> list[list[int]]:
    """The prompts as the engine will run them: `truncate_prompt_tokens` keeps each one's last that-many tokens (the
    engine's rule, applied here first so that fit, the rate-limit cost, usage and echo all count what runs; the
    engine's own pass is then a no-op). A value below 1 is left alone for validation to refuse."""
    keep = fields.get("truncate_prompt_tokens")
    if keep is None or keep < 1:
        return prompts
    return [p[-keep:] for p in prompts]


def _rate_error(limit: str | None, retry_after_s: float) -> APIError:
    return rate_limited(f"Rate limit reached for {limit} per minute; retry after {retry_after_s:.1f} s.",
                        retry_after_s)

