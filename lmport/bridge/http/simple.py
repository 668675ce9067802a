"""lmport's own simple endpoints beside the OpenAI API: `POST /generate` (one prompt), `POST /chat` (messages
through the chat template), `GET /models` and `POST /v1/completions/batch` (many prompts, one response, one engine
call so the scheduler batches them).

The sampling fields sit at the top level of the body under SamplingParams' own names and are validated by
SamplingParams (an unknown one is refused by name, with a did-you-mean). Replies carry the text, the token counts and
the timing (`generation_time` in seconds from admission to the last token, `tokens_per_second` over it). With
`stream: true`, `/generate` and `/chat` send SSE `data: {text, request_id, tokens_generated}` events as tokens
arrive, then one `event: final` whose data is the whole reply. Auth, rate limits and the admission order are the
/v1 endpoints' (state.py); a client that goes away aborts its engine request, as there."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from lmport.bridge.http import sse
from lmport.bridge.http.errors import bad_request
from lmport.bridge.http.protocol import ChatMessage, template_messages
from lmport.bridge.http.replies import Reply, has_news, respond
from lmport.bridge.http.routes import authenticated, get_state
from lmport.bridge.http.state import Admitted, ServerState, truncate
from lmport.engine.sampling_params import SamplingParams

router = APIRouter()

DEFAULT_MAX_TOKENS: int = SamplingParams.__dataclass_fields__["max_tokens"].default
# SamplingParams fields these replies have no place for (one text per prompt, no logprobs, the server picks the
# output kind): refused by name rather than silently dropped
_OTHER_ENDPOINTS = {"n": "one completion per prompt here", "logprobs": "no logprobs here",
                    "prompt_logprobs": "no logprobs here", "output_kind": "the server sets it",
                    "detokenize": "replies are text"}

NonEmptyText = Annotated[str, Field(min_length=1)]


class _SimpleRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # every other key is a SamplingParams field, validated there
    model: str | None = None
    # typed here because admission reads them before SamplingParams validates the rest
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    truncate_prompt_tokens: int | None = None

    def sampling_fields(self) -> dict[str, Any]:
        fields = dict(self.model_extra or {})
        for name in ("max_tokens", "truncate_prompt_tokens"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        for name in fields:
            if name in _OTHER_ENDPOINTS:
                raise bad_request(name, f"{name} is not supported on this endpoint ({_OTHER_ENDPOINTS[name]}); "
                                        f"the /v1 API has it")
        return fields


class GenerateRequest(_SimpleRequest):
    prompt: NonEmptyText
    stream: bool = False


class ChatRequest(_SimpleRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # unset: up to the end of the context, as on /v1/chat/completions
    chat_template: str | None = None
    add_generation_prompt: bool = True
    stream: bool = False


class BatchRequest(_SimpleRequest):
    prompts: list[NonEmptyText] = Field(min_length=1)


PromptIds = Callable[[ServerState], Awaitable[list[list[int]]]]  # given the state route() bound to the model


async def _answer(reply_class: type[SimpleReply], body: _SimpleRequest, request: Request, state: ServerState,
                  identity: str, prompt_ids: PromptIds, prompt_param: str, stream: bool) -> Response:
    """The admission steps of /v1 (model, readiness, prompt ids, fit, sampling fields, rate limit), one engine call
    for every prompt, then the reply, whole or streamed. The clock of `generation_time` starts at the fit."""
    model, state = await state.route(body.model)
    fields = body.sampling_fields()
    prompts = truncate(await prompt_ids(state), fields)
    began = time.monotonic()
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    param = f"{prompt_param}[{longest}]" if prompt_param == "prompts" else prompt_param
    sampling = state.sampling(state.fit(prompts, fields, param, "max_tokens"))
    admitted = await state.admit(identity, prompts, sampling, "gen", {"prompts": prompt_param}, model=model)
    admitted.generation.watch(request.receive)
    return await respond(reply_class(model, admitted, state, began), stream, include_usage=False)


class SimpleReply(Reply):
    """One prompt's text as lmport's reply; streamed as `{text, request_id, tokens_generated}` events and a final
    event (the one carrying `finish_reason`) holding the whole reply."""

    stream_end = None  # the final event closes the stream

    def __init__(self, model: str, admitted: Admitted, state: ServerState, began: float) -> None:
        super().__init__(model, admitted, state)
        self.began = began

    def timing(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.began
        usage = self.admitted.generation.usage
        return {"prompt_tokens": usage.prompt_tokens, "tokens_generated": usage.completion_tokens,
                "generation_time": elapsed, "tokens_per_second": usage.completion_tokens / elapsed if elapsed else 0.0}

    def _reply(self, text: str, finish_reason: str | None, stop_reason: Any) -> dict[str, Any]:
        return {"text": text, "request_id": self.admitted.request_id, "model": self.model,
                "finish_reason": finish_reason, "stop_reason": stop_reason, **self.timing()}

    def whole(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        [out] = results[0]["outputs"]
        return self._reply(out["text"], out.get("finish_reason"), out.get("stop_reason"))

    async def deltas(self) -> AsyncIterator[dict[str, Any]]:
        generation = self.admitted.generation
        text, finish_reason, stop_reason = "", None, None
        async for chunk in generation.chunks():
            for out in filter(has_news, chunk.data["outputs"]):
                text += out["text"]
                finish_reason, stop_reason = out.get("finish_reason"), out.get("stop_reason")
                yield {"text": out["text"], "request_id": self.admitted.request_id,
                       "tokens_generated": generation.usage.completion_tokens}
        if not generation.client_gone:
            yield self._reply(text, finish_reason, stop_reason)

    def encode(self, chunk: dict[str, Any]) -> bytes:
        return sse.event(chunk, "final" if "finish_reason" in chunk else None)


class BatchReply(SimpleReply):
    """Every prompt's text in one reply, in prompt order; the counts and timing are the whole batch's."""

    def whole(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        items = [{"index": i, "text": out["text"], "tokens_generated": len(out["token_ids"]),
                  "finish_reason": out.get("finish_reason"), "stop_reason": out.get("stop_reason")}
                 for i, result in enumerate(results) for out in result["outputs"]]
        return {"request_id": self.admitted.request_id, "model": self.model, "results": items, **self.timing()}


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request, state: ServerState = Depends(get_state),
                   identity: str = Depends(authenticated)) -> Response:
    return await _answer(SimpleReply, body, request, state, identity,
                         lambda bound: bound.prompt_ids([body.prompt]), "prompt", body.stream)


@router.post("/chat")
async def chat(body: ChatRequest, request: Request, state: ServerState = Depends(get_state),
               identity: str = Depends(authenticated)) -> Response:
    async def prompt_ids(bound: ServerState) -> list[list[int]]:
        return [await bound.chat_prompt(template_messages(body.messages), body.chat_template,
                                        body.add_generation_prompt)]

    return await _answer(SimpleReply, body, request, state, identity, prompt_ids, "messages", body.stream)


@router.post("/v1/completions/batch")
async def batch(body: BatchRequest, request: Request, state: ServerState = Depends(get_state),
                identity: str = Depends(authenticated)) -> Response:
    return await _answer(BatchReply, body, request, state, identity,
                         lambda bound: bound.prompt_ids(list(body.prompts)), "prompts", stream=False)


@router.get("/models")
async def models(state: ServerState = Depends(get_state), _: str = Depends(authenticated)) -> dict[str, Any]:
    keys = ("root", "ready", "loaded", "max_model_len")
    return {"models": [{"name": entry["id"], **{key: entry[key] for key in keys}} for entry in await state.listing()]}
