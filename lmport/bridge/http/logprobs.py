"""Engine logprobs (per position: a list of {token_id, logprob, rank, decoded_token}, the sampled token among them)
in OpenAI's two formats: the legacy completions object and the chat `content` list."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Position = list[dict[str, Any]] | None
Decode = Callable[[int], str]


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -9999.0  # JSON has no -inf; vLLM answers -9999.0 too


def _sampled(token_id: int, position: Position, decode: Decode) -> tuple[str, float | None]:
    for entry in position or ():
        if entry["token_id"] == token_id:
            text = entry["decoded_token"]
            return (decode(token_id) if text is None else text), _finite(entry["logprob"])
    return decode(token_id), None


def _top(position: Position, k: int) -> list[dict[str, Any]]:
    entries = sorted(position or (), key=lambda e: e["rank"] if e["rank"] is not None else math.inf)
    return entries[:k]


class CompletionLogprobs:
    """Builds the completions `logprobs` object incrementally (streaming sends one per chunk, offsets continue)."""

    def __init__(self, top_n: int, decode: Decode, text_offset: int = 0) -> None:
        self.top_n = top_n
        self.decode = decode
        self.offset = text_offset

    def build(self, token_ids: list[int], positions: list[Position]) -> dict[str, Any]:
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for token_id, position in zip(token_ids, positions):
            text, logprob = _sampled(token_id, position, self.decode)
            tokens.append(text)
            token_logprobs.append(logprob)
            top_logprobs.append(None if position is None else {
                (e["decoded_token"] if e["decoded_token"] is not None else self.decode(e["token_id"])):
                    _finite(e["logprob"]) for e in [*_top(position, self.top_n), *_matching(position, token_id)]})
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}


def _matching(position: Position, token_id: int) -> list[dict[str, Any]]:
    # the sampled token is always listed among the top logprobs, as vLLM and OpenAI do
    return [e for e in position or () if e["token_id"] == token_id]


def chat_logprobs(token_ids: list[int], positions: list[Position], top_n: int, decode: Decode) -> dict[str, Any]:
    content = []
    for token_id, position in zip(token_ids, positions):
        text, logprob = _sampled(token_id, position, decode)
        top = []
        for entry in _top(position, top_n):
            token = entry["decoded_token"] if entry["decoded_token"] is not None else decode(entry["token_id"])
            top.append({"token": token, "logprob": _finite(entry["logprob"]), "bytes": list(token.encode())})
        content.append({"token": text, "logprob": -9999.0 if logprob is None else logprob,
                        "bytes": list(text.encode()), "top_logprobs": top})
    return {"content": content}
