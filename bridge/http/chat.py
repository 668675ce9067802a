"""POST /v1/chat/completions (and its WebSocket twin): messages through the model's chat template -> OpenAI
`chat.completion` objects, or `chat.completion.chunk` deltas (role first, then content, finish reason last)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from bridge.http import sse
from bridge.http.completions import CLIENT_CLOSED
from bridge.http.errors import from_engine_error
from bridge.http.logprobs import chat_logprobs
from bridge.http.protocol import ChatCompletionRequest
from bridge.http.state import Admitted, ServerState, truncate

Receive = Callable[[], Awaitable[dict[str, Any]]]


async def admit_chat(body: ChatCompletionRequest, state: ServerState, identity: str,
                     receive: Receive) -> ChatView:
    """Validate and submit; every refusal raises APIError before anything is sent."""
    model = state.check_model(body.model)
    state.require_ready()
    fields, renames = body.sampling()
    messages = body.template_messages()
    [prompt] = truncate([await state.chat_prompt(messages, body.chat_template, body.add_generation_prompt)], fields)
    fields = state.fit([prompt], fields, "messages", renames.get("max_tokens", "max_tokens"))
    sampling = state.sampling(fields, renames)
    admitted = await state.admit(identity, [prompt], sampling, "chatcmpl", {**renames, "prompts": "messages"})
    admitted.generation.watch(receive)
    return ChatView(body, model, admitted, state)


async def create_chat_completion(body: ChatCompletionRequest, request: Request, state: ServerState,
                                 identity: str) -> Response:
    view = await admit_chat(body, state, identity, request.receive)
    if body.stream:
        return StreamingResponse(view.sse(), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
    generation = view.admitted.generation
    try:
        results = await generation.collect()
    finally:
        state.release(view.admitted)
    if generation.client_gone:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(view.whole(results[0]))


class ChatView:
    def __init__(self, body: ChatCompletionRequest, model: str, admitted: Admitted, state: ServerState) -> None:
        self.body = body
        self.model = model
        self.admitted = admitted
        self.state = state
        self.top_n = body.top_logprobs or 0

    def _decode(self, token_id: int) -> str:
        return self.state.backend.detokenize([token_id])

    def _logprobs(self, out: dict[str, Any]) -> dict[str, Any] | None:
        if not self.body.logprobs:
            return None
        return chat_logprobs(out["token_ids"], out.get("logprobs") or [None] * len(out["token_ids"]), self.top_n,
                             self._decode)

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.admitted.request_id, "object": kind, "created": self.admitted.created, "model": self.model,
                "choices": choices}

    def whole(self, result: dict[str, Any]) -> dict[str, Any]:
        choices = [{"index": out["index"], "message": {"role": "assistant", "content": out["text"]},
                    "logprobs": self._logprobs(out), "finish_reason": out.get("finish_reason"),
                    "stop_reason": out.get("stop_reason")} for out in result["outputs"]]
        return {**self._envelope("chat.completion", choices), "usage": self.admitted.generation.usage.to_dict()}

    async def chunks(self, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        """chat.completion.chunk objects: each choice's role first, then content deltas, the last one carrying the
        finish reason; then (include_usage) a usage chunk with no choices. The caller must release()."""
        generation = self.admitted.generation
        usage_field = {"usage": None} if include_usage else {}
        kind = "chat.completion.chunk"
        for index in range(self.body.n):
            yield {**self._envelope(kind, [{"index": index, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]), **usage_field}
        async for chunk in generation.chunks():
            for out in chunk.data["outputs"]:
                if not out["text"] and not out.get("finish_reason") and not out["token_ids"]:
                    continue
                delta = {"content": out["text"]} if out["text"] else {}
                choice = {"index": out["index"], "delta": delta, "logprobs": self._logprobs(out),
                          "finish_reason": out.get("finish_reason")}
                if out.get("finish_reason"):
                    choice["stop_reason"] = out.get("stop_reason")
                yield {**self._envelope(kind, [choice]), **usage_field}
        if include_usage and not generation.client_gone:
            yield {**self._envelope(kind, []), "usage": generation.usage.to_dict()}

    def release(self) -> None:
        self.state.release(self.admitted)

    async def sse(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.chunks(self.body.include_usage):
                yield sse.event(chunk)
            if self.admitted.generation.client_gone:
                return
        except Exception as exc:  # noqa: BLE001 — headers are gone: the error travels as an event
            yield sse.event(from_engine_error(exc, self.admitted.renames).body())
        finally:
            self.release()
        yield sse.DONE
