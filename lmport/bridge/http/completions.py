"""POST /v1/completions: prompts (text, texts, token ids, lists of token ids) -> OpenAI `text_completion` objects,
whole or streamed as server-sent events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from lmport.bridge.http.logprobs import CompletionLogprobs
from lmport.bridge.http.protocol import CompletionRequest
from lmport.bridge.http.replies import Reply, has_news, respond
from lmport.bridge.http.state import Admitted, ServerState, truncate


async def create_completion(body: CompletionRequest, request: Request, state: ServerState, identity: str) -> Response:
    model, state = await state.route(body.model)
    fields = body.sampling()
    texts = body.prompts()
    whole = await state.prompt_ids(texts)
    prompts = truncate(whole, fields)
    # echo shows the prompt the model saw: a truncated one is its kept tokens' text, not the text that was sent
    texts = [text if len(kept) == len(all_ids) else kept for text, kept, all_ids in zip(texts, prompts, whole)]
    sampling = state.sampling(state.fit(prompts, fields, "prompt", "max_tokens"))
    admitted = await state.admit(identity, prompts, sampling, "cmpl", {"prompts": "prompt"}, model=model)
    admitted.generation.watch(request.receive)
    return await respond(CompletionReply(body, model, admitted, state, texts, prompts), body.stream,
                         body.include_usage)


class CompletionReply(Reply):
    """Engine outputs as `text_completion` objects, keeping per-choice state (echo, logprob offsets) across chunks."""

    kind = chunk_kind = "text_completion"

    def __init__(self, body: CompletionRequest, model: str, admitted: Admitted, state: ServerState,
                 texts: list[str | list[int]], prompts: list[list[int]]) -> None:
        super().__init__(model, admitted, state)
        self.body = body
        self.texts = texts
        self.prompts = prompts
        self.n = body.n
        self.logprob_builders: dict[int, CompletionLogprobs] = {}
        self.started: set[int] = set()

    def _prompt_text(self, prompt_index: int) -> str:
        text = self.texts[prompt_index]
        return text if isinstance(text, str) else self.state.backend.detokenize(text)

    def _choice(self, prompt_index: int, out: dict[str, Any], prompt_logprobs: list[Any] | None) -> dict[str, Any]:
        """One choice (whole, or the next chunk of it); the echoed prompt goes before its first text."""
        index = prompt_index * self.n + out["index"]
        text = out["text"]
        logprobs = None
        first = index not in self.started
        self.started.add(index)
        if self.body.logprobs is not None:
            builder = self.logprob_builders.setdefault(index, CompletionLogprobs(self.body.logprobs, self.decode))
            logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            if first and self.body.echo:
                positions = prompt_logprobs or [None] * len(self.prompts[prompt_index])
                logprobs = builder.build(self.prompts[prompt_index], positions)
            tail = builder.build(out["token_ids"], out.get("logprobs") or [None] * len(out["token_ids"]))
            logprobs = {key: logprobs[key] + tail[key] for key in tail}
        if first and self.body.echo:
            text = self._prompt_text(prompt_index) + text
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": out.get("finish_reason"),
                "stop_reason": out.get("stop_reason")}

    def whole(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        choices = [self._choice(p, out, result.get("prompt_logprobs"))
                   for p, result in enumerate(results) for out in result["outputs"]]
        choices.sort(key=lambda c: c["index"])
        return {**self.envelope(self.kind, choices), "usage": self.admitted.generation.usage.to_dict()}

    async def deltas(self) -> AsyncIterator[dict[str, Any]]:
        async for chunk in self.admitted.generation.chunks():
            for out in chunk.data["outputs"]:
                choice = self._choice(chunk.data["index"], out, chunk.data.get("prompt_logprobs"))
                if choice["text"] or has_news(out):  # an echoed prompt is news too
                    yield self.envelope(self.chunk_kind, [choice])
