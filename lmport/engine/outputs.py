"""Request results in vLLM's shapes, as plain dataclasses that turn into plain data (`to_dict`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None  # 1-based rank in the model's raw distribution
    decoded_token: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"logprob": self.logprob, "rank": self.rank, "decoded_token": self.decoded_token}


# One position's candidates: token id -> Logprob (the sampled token plus the top-k).
PositionLogprobs = dict[int, Logprob]


def logprobs_to_list(position: PositionLogprobs | None) -> list[dict[str, Any]] | None:
    """Wire form of one position: a list of {token_id, logprob, rank, decoded_token} (map keys must be strings)."""
    if position is None:
        return None
    return [{"token_id": token_id, **lp.to_dict()} for token_id, lp in position.items()]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI-shaped, parsed from text when the chat had tools

    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "text": self.text,
            "token_ids": list(self.token_ids),
            "cumulative_logprob": self.cumulative_logprob,
            "logprobs": None if self.logprobs is None else [logprobs_to_list(p) for p in self.logprobs],
            "finish_reason": self.finish_reason,
            "stop_reason": self.stop_reason,
            **({} if self.tool_calls is None else {"tool_calls": self.tool_calls}),
        }


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_cached_tokens: int = 0

    @property
    def time_in_queue(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    def to_dict(self) -> dict[str, Any]:
        return {
            "arrival_time": self.arrival_time,
            "first_scheduled_time": self.first_scheduled_time,
            "first_token_time": self.first_token_time,
            "last_token_time": self.last_token_time,
            "finished_time": self.finished_time,
            "time_in_queue": self.time_in_queue,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_generation_tokens": self.num_generation_tokens,
            "num_cached_tokens": self.num_cached_tokens,
        }


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "prompt": self.prompt,
            "prompt_token_ids": list(self.prompt_token_ids),
            "prompt_logprobs": None if self.prompt_logprobs is None
            else [logprobs_to_list(p) for p in self.prompt_logprobs],
            "outputs": [o.to_dict() for o in self.outputs],
            "finished": self.finished,
            "metrics": self.metrics.to_dict(),
            "num_cached_tokens": self.num_cached_tokens,
        }


@dataclass(slots=True)
class EmbeddingOutput:
    """The result of one embed input: `embedding` is None only when the request was aborted."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    embedding: list[float] | None
    metrics: RequestMetrics
    finished: bool = True  # an embedding arrives once, complete

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "prompt": self.prompt,
                "prompt_token_ids": list(self.prompt_token_ids), "embedding": self.embedding,
                "metrics": self.metrics.to_dict()}
