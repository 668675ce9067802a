"""POST /v1/chat/completions (and its WebSocket twin): messages through the model's chat template -> OpenAI
`chat.completion` objects, or `chat.completion.chunk` deltas (role first, then content, finish reason last)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from lmport.bridge.http.errors import bad_request
from lmport.bridge.http.logprobs import chat_logprobs
from lmport.bridge.http.protocol import ChatCompletionRequest
from lmport.bridge.http.replies import Reply, has_news, respond
from lmport.bridge.http.state import Admitted, ServerState, truncate
from lmport.engine.tool_calls import ToolCalling, tool_finish_reason

Receive = Callable[[], Awaitable[dict[str, Any]]]


async def admit_chat(body: ChatCompletionRequest, state: ServerState, identity: str,
                     receive: Receive) -> ChatView:
    """Validate and submit; every refusal raises APIError before anything is sent."""
    model, state = await state.route(body.model)
    fields, renames = body.sampling()
    calling = state.tool_calling(body.tools, body.tool_choice, body.chat_template)
    constraint = calling.structured_outputs() if calling is not None else None
    if constraint is not None:  # tool_choice 'required' or a named tool, enforced as vLLM does
        if "structured_outputs" in fields:
            raise bad_request("tool_choice", "tool_choice 'required' or a named tool constrains the output "
                              "itself: leave out response_format and structured_outputs")
        fields["structured_outputs"] = constraint
    messages = body.template_messages()
    template_tools = calling.template_tools if calling is not None else None
    [prompt] = truncate([await state.chat_prompt(messages, body.chat_template, body.add_generation_prompt,
                                                 template_tools)], fields)
    fields = state.fit([prompt], fields, "messages", renames.get("max_tokens", "max_tokens"))
    sampling = state.sampling(fields, renames)
    admitted = await state.admit(identity, [prompt], sampling, "chatcmpl", {**renames, "prompts": "messages"},
                                 model=model)
    admitted.generation.watch(receive)
    return ChatView(body, model, admitted, state, calling)


async def create_chat_completion(body: ChatCompletionRequest, request: Request, state: ServerState,
                                 identity: str) -> Response:
    return await respond(await admit_chat(body, state, identity, request.receive), body.stream, body.include_usage)


class ChatView(Reply):
    """Engine outputs as `chat.completion` objects, or `chat.completion.chunk` deltas."""

    kind = "chat.completion"
    chunk_kind = "chat.completion.chunk"

    def __init__(self, body: ChatCompletionRequest, model: str, admitted: Admitted, state: ServerState,
                 calling: ToolCalling | None = None) -> None:
        super().__init__(model, admitted, state)
        self.body = body
        self.top_n = body.top_logprobs or 0
        self.calling = calling  # tools: content and tool calls are parsed out of the text

    def _logprobs(self, out: dict[str, Any]) -> dict[str, Any] | None:
        if not self.body.logprobs:
            return None
        return chat_logprobs(out["token_ids"], out.get("logprobs") or [None] * len(out["token_ids"]), self.top_n,
                             self.decode)

    def _message(self, out: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """The assistant message of a whole completion, and its finish reason ('tool_calls' after calls)."""
        if self.calling is None:
            return {"role": "assistant", "content": out["text"]}, out.get("finish_reason")
        parsed = self.calling.parse(out["text"], out.get("finish_reason"))
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
        if parsed.tool_calls:
            message["tool_calls"] = parsed.tool_calls
        return message, parsed.finish_reason

    def whole(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        choices = []
        for out in results[0]["outputs"]:
            message, finish_reason = self._message(out)
            choices.append({"index": out["index"], "message": message, "logprobs": self._logprobs(out),
                            "finish_reason": finish_reason, "stop_reason": out.get("stop_reason")})
        return {**self.envelope(self.kind, choices), "usage": self.admitted.generation.usage.to_dict()}

    async def deltas(self) -> AsyncIterator[dict[str, Any]]:
        """Each choice's role first, then content (or tool-call) deltas, the last one carrying the finish reason."""
        for index in range(self.body.n):
            yield self.envelope(self.chunk_kind, [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}])
        parsers = {index: self.calling.stream() for index in range(self.body.n)} if self.calling else {}
        called: set[int] = set()
        async for chunk in self.admitted.generation.chunks():
            for out in filter(has_news, chunk.data["outputs"]):
                index, finish_reason = out["index"], out.get("finish_reason")
                if not parsers:
                    deltas = [{"content": out["text"]}] if out["text"] else [{}]
                else:  # tool calls come out of the text: content and call deltas as the parser finds them
                    parser = parsers[index]
                    deltas = parser.feed(out["text"]) + (parser.finish(finish_reason) if finish_reason else [])
                    called.update(index for d in deltas if "tool_calls" in d)
                    finish_reason = tool_finish_reason(finish_reason, index in called)
                    deltas = deltas or [{}]
                for i, delta in enumerate(deltas):
                    last = i == len(deltas) - 1
                    choice = {"index": index, "delta": delta, "logprobs": self._logprobs(out) if last else None,
                              "finish_reason": finish_reason if last else None}
                    if last and finish_reason:
                        choice["stop_reason"] = out.get("stop_reason")
                    yield self.envelope(self.chunk_kind, [choice])
