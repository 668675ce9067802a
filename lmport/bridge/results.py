"""The shapes of generate/chat/embed results on the wire: the single source of the manifest's `results` section, from which
the clients generate their result types (TypeScript interfaces, Go structs) and docs/protocol.md its tables.

Each record is a TypedDict whose fields carry their doc in `Annotated`; `NotRequired` marks a key that is left out
rather than sent as null. tests/test_bridge_engine.py checks real worker output against these shapes, key for key.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, TypedDict

from typing_extensions import NotRequired  # typing's own from Python 3.11


class LogprobEntry(TypedDict):
    token_id: Annotated[int, "The candidate token."]
    logprob: Annotated[float, "Its log-probability in the model's raw distribution."]
    rank: Annotated[int | None, "Its 1-based rank in that distribution."]
    decoded_token: Annotated[str | None, "Its text (null when detokenize is off)."]


class ToolCallFunction(TypedDict):
    name: Annotated[str, "The tool called."]
    arguments: Annotated[str, "Its arguments as JSON text (as OpenAI sends them)."]


class ToolCall(TypedDict):
    id: Annotated[str, "The call's id ('call_...'); a tool message answering it sends it as tool_call_id."]
    type: Annotated[str, "Always 'function'."]
    function: Annotated[ToolCallFunction, "The tool and its arguments."]


class CompletionOutput(TypedDict):
    index: Annotated[int, "Which of the request's n completions."]
    text: Annotated[str, "The generated text."]
    token_ids: Annotated[list[int], "The generated tokens."]
    cumulative_logprob: Annotated[float | None, "Sum of the sampled tokens' log-probabilities (with logprobs)."]
    logprobs: Annotated[list[list[LogprobEntry]] | None, "Per generated token: the sampled token and the top "
                                                         "candidates (with logprobs)."]
    finish_reason: Annotated[str | None, "'stop', 'length' or 'abort'; null while running."]
    stop_reason: Annotated[int | str | None, "The stop string or stop token id that ended it."]
    tool_calls: NotRequired[Annotated[list[ToolCall], "The tools it called (chat with tools, when it called any); "
                                                      "text keeps the raw output."]]


class RequestMetrics(TypedDict):
    arrival_time: Annotated[float, "Unix time the request arrived."]
    first_scheduled_time: Annotated[float | None, "Unix time of its first engine step."]
    first_token_time: Annotated[float | None, "Unix time its first token was sampled."]
    last_token_time: Annotated[float | None, "Unix time its last token was sampled."]
    finished_time: Annotated[float | None, "Unix time it finished."]
    time_in_queue: Annotated[float | None, "Seconds from arrival to the first step."]
    num_prompt_tokens: Annotated[int, "Prompt tokens."]
    num_generation_tokens: Annotated[int, "Tokens generated, all completions together."]
    num_cached_tokens: Annotated[int, "Prompt tokens found in the prefix cache."]


class RequestOutput(TypedDict):
    request_id: Annotated[str, "The engine's id of the request."]
    prompt: Annotated[str | None, "The prompt text (null for token-id prompts and chat)."]
    prompt_token_ids: Annotated[list[int], "The prompt as tokens (for chat: the templated conversation)."]
    prompt_logprobs: Annotated[list[list[LogprobEntry] | None] | None, "Per prompt token (the first is null): its "
                                                                       "candidates (with prompt_logprobs)."]
    outputs: Annotated[list[CompletionOutput], "The completions, n of them."]
    finished: Annotated[bool, "Always true in a final result."]
    metrics: Annotated[RequestMetrics, "Timings and token counts."]
    num_cached_tokens: Annotated[int, "Prompt tokens found in the prefix cache."]


class ChunkOutput(TypedDict):
    index: Annotated[int, "Which of the request's n completions."]
    text: Annotated[str, "The new text (output_kind 'delta', the default when streaming) or all so far."]
    token_ids: Annotated[list[int], "The new tokens (or all so far, like text)."]
    logprobs: NotRequired[Annotated[list[list[LogprobEntry]], "Per new token (with logprobs)."]]
    finish_reason: Annotated[str | None, "Set in the completion's last chunk."]
    stop_reason: Annotated[int | str | None, "The stop string or stop token id that ended it."]
    tool_calls: NotRequired[Annotated[list[ToolCall], "In the completion's last chunk (chat with tools, when it "
                                                      "called any): every call of the whole completion."]]


class Chunk(TypedDict):
    index: Annotated[int, "Position of the prompt in the call's prompt list."]
    request_id: Annotated[str, "The engine's id of the request."]
    outputs: Annotated[list[ChunkOutput], "The completions that advanced."]
    finished: Annotated[bool, "True in the request's last chunk."]
    prompt_logprobs: NotRequired[Annotated[list[list[LogprobEntry] | None], "In the request's first chunk, with "
                                                                              "prompt_logprobs."]]


class Usage(TypedDict):
    prompt_tokens: Annotated[int, "Prompt tokens of every request of the call."]
    completion_tokens: Annotated[int, "Tokens generated."]
    total_tokens: Annotated[int, "Both together."]


class SummaryOutput(TypedDict):
    index: Annotated[int, "Which of the request's n completions."]
    finish_reason: Annotated[str | None, "'stop', 'length' or 'abort'."]
    stop_reason: Annotated[int | str | None, "The stop string or stop token id that ended it."]
    completion_tokens: Annotated[int, "Tokens this completion generated."]
    cumulative_logprob: Annotated[float | None, "Sum of the sampled tokens' log-probabilities (with logprobs)."]


class SummaryRequest(TypedDict):
    index: Annotated[int, "Position of the prompt in the call's prompt list."]
    request_id: Annotated[str, "The engine's id of the request."]
    prompt_tokens: Annotated[int, "Prompt tokens."]
    num_cached_tokens: Annotated[int, "Prompt tokens found in the prefix cache."]
    metrics: Annotated[RequestMetrics, "Timings and token counts."]
    outputs: Annotated[list[SummaryOutput], "How each completion ended."]


class Summary(TypedDict):
    usage: Annotated[Usage, "Token counts of the whole call."]
    requests: Annotated[list[SummaryRequest], "One per prompt, in order."]


class Embedding(TypedDict):
    index: Annotated[int, "Position of the input in the call's input list."]
    embedding: Annotated[list[float], "The vector (dimensions long when given, else the model's hidden size)."]
    prompt_tokens: Annotated[int, "Tokens of this input."]


class EmbedUsage(TypedDict):
    prompt_tokens: Annotated[int, "Tokens of every input of the call."]
    total_tokens: Annotated[int, "The same: embedding generates nothing."]


class EmbedResult(TypedDict):
    data: Annotated[list[Embedding], "One per input, in order."]
    usage: Annotated[EmbedUsage, "Token counts of the whole call."]


RECORDS: tuple[type, ...] = (LogprobEntry, ToolCallFunction, ToolCall, CompletionOutput, RequestMetrics, RequestOutput,
                             ChunkOutput, Chunk, Usage,
                             SummaryOutput, SummaryRequest, Summary, Embedding, EmbedUsage, EmbedResult)
_NAMES = {record: record.__name__ for record in RECORDS}
_SCALARS = {str: "str", int: "int", float: "float", bool: "bool", type(None): "null"}


def type_expr(annotation: object) -> str:
    """An annotation as a result type expression: str/int/float/bool/null, a record name, list[T], and T|U."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return "|".join(type_expr(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list[{type_expr(typing.get_args(annotation)[0])}]"
    if annotation in _NAMES:
        return _NAMES[annotation]
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    raise TypeError(f"no result type for {annotation!r}")


def record_schema(record: type) -> list[dict[str, object]]:
    """[{name, type, required, doc}] of one record, in declaration order."""
    hints = typing.get_type_hints(record, include_extras=True)
    fields = []
    for name, hint in hints.items():
        # read from the hint: __required_keys__ misses NotRequired under postponed annotations
        required = typing.get_origin(hint) is not NotRequired
        if not required:
            hint = typing.get_args(hint)[0]
        base, doc = typing.get_args(hint)
        fields.append({"name": name, "type": type_expr(base), "required": required, "doc": doc})
    return fields


def results_schema() -> dict[str, list[dict[str, object]]]:
    return {record.__name__: record_schema(record) for record in RECORDS}


def split_union(expr: str) -> list[str]:
    """Top-level alternatives of a type expression ("list[A|null]|null" -> ["list[A|null]", "null"])."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "|" and depth == 0:
            parts.append(expr[start:i])
            start = i + 1
    return [*parts, expr[start:]]
