"""POST /v1/chat/completions (and its WebSocket twin): messages through the model's chat template -> OpenAI
`chat.completion` objects, or `chat.completion.chunk` deltas (role first, then content, finish reason last)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from lmport.bridge.http.logprobs import chat_logprobs
from lmport.bridge.http.protocol import ChatCompletionRequest
from lmport.bridge.http.replies import Reply, has_news, respond
from lmport.bridge.http.state import Admitted, ServerState, truncate

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
    return await respond(await admit_chat(body, state, identity, request.receive), body.stream, body.include_usage)


class ChatView(Reply):
    """Engine outputs as `chat.completion` objects, or `chat.completion.chunk` deltas."""

    kind = "chat.completion"
    chunk_kind = "chat.completion.chunk"

    def __init__(self, body: ChatCompletionRequest, model: str, admitted: Admitted, state: ServerState) -> None:
        super().__init__(model, admitted, state)
        self.body = body
        self.top_n = body.top_logprobs or 0

    def _logprobs(self, out: dict[str, Any]) -> dict[str, Any] | None:
        if not self.body.logprobs:
            return None
        return chat_logprobs(out["token_ids"], out.get("logprobs") or [None] * len(out["token_ids"]), self.top_n,
                             self.decode)

    def whole(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        choices = [{"index": out["index"], "message": {"role": "assistant", "content": out["text"]},
                    "logprobs": self._logprobs(out), "finish_reason": out.get("finish_reason"),
                    "stop_reason": out.get("stop_reason")} for out in results[0]["outputs"]]
        return {**self.envelope(self.kind, choices), "usage": self.admitted.generation.usage.to_dict()}

    async def deltas(self) -> AsyncIterator[dict[str, Any]]:
        """Each choice's role first, then content deltas, the last one carrying the finish reason."""
        for index in range(self.body.n):
            yield self.envelope(self.chunk_kind, [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}])
        async for chunk in self.admitted.generation.chunks():
            for out in filter(has_news, chunk.data["outputs"]):
                choice = {"index": out["index"], "delta": {"content": out["text"]} if out["text"] else {},
                          "logprobs": self._logprobs(out), "finish_reason": out.get("finish_reason")}
                if out.get("finish_reason"):
                    choice["stop_reason"] = out.get("stop_reason")
                yield self.envelope(self.chunk_kind, [choice])
