"""OpenAI request bodies (with vLLM's extra sampling fields) and their translation into SamplingParams fields.

Unknown fields are refused by name (a typo must not be silently ignored); type errors name the field too. Range
checks are left to SamplingParams, the one place they live, and its field names are mapped back onto the request's
(`max_completion_tokens`, `top_logprobs`) when it complains.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmport.bridge.http.errors import bad_request
from lmport.engine.errors import InvalidParams
from lmport.engine.structured_outputs import StructuredOutputsParams

TokenIds = list[int]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


# request fields that are SamplingParams fields of the same name and meaning
_PASSTHROUGH = ("n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "stop", "seed", "top_k", "min_p",
                "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids", "skip_special_tokens",
                "spaces_between_special_tokens", "include_stop_str_in_output", "allowed_token_ids", "bad_words",
                "truncate_prompt_tokens", "logit_bias", "structured_outputs")


class _SamplingFields(_Strict):
    """Fields shared by both endpoints, named as OpenAI and vLLM name them."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    structured_outputs: dict[str, Any] | None = None  # checked by SamplingParams, like every range

    def check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options", "stream_options is only allowed when stream is true")

    def common_sampling(self) -> dict[str, Any]:
        """The SamplingParams fields this request sets (unset ones keep SamplingParams' defaults)."""
        return {name: getattr(self, name) for name in _PASSTHROUGH if getattr(self, name) is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    prompt_logprobs: int | None = None

    def prompts(self) -> list[str | TokenIds]:
        """The prompts of the batch: one string, a list of strings, one token-id list or a list of them."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise bad_request("prompt", "prompt must not be empty")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    def sampling(self) -> dict[str, Any]:
        self.check_common()
        if self.suffix is not None:
            raise bad_request("suffix", "suffix (insertion) is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of", f"best_of must equal n ({self.n}); this server returns every completion")
        params = self.common_sampling()
        if self.max_tokens is not None:
            params["max_tokens"] = self.max_tokens
        if self.logprobs is not None:
            params["logprobs"] = self.logprobs
        if self.prompt_logprobs is not None:
            params["prompt_logprobs"] = self.prompt_logprobs
        elif self.echo and self.logprobs is not None:
            params["prompt_logprobs"] = self.logprobs  # echo shows the prompt's logprobs too
        return params


class ChatMessage(BaseModel):
    # extra keys (name, tool_call_id, ...) travel to the chat template untouched
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None

    def template_dict(self, index: int) -> dict[str, Any]:
        """The message as the chat template takes it; `index` (its place in `messages`) names a refused part."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            texts = []
            for i, part in enumerate(self.content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"messages[{index}].content[{i}]", "only text content parts "
                                      "({\"type\": \"text\", \"text\": ...}) are supported")
                texts.append(part["text"])
            message["content"] = "\n".join(texts)
        return message


class JsonSchemaFormat(_Strict):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the output always follows the schema: strict or not, it is enforced


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def structured_outputs(self) -> dict[str, Any] | None:
        """The structured_outputs this format asks for (None for text)."""
        if self.type == "json_object":
            return {"json_object": True}
        if self.type == "json_schema":
            if self.json_schema is None:
                raise bad_request("response_format.json_schema", "type 'json_schema' needs json_schema "
                                  "{name, schema, strict}")
            constraint = {"json": self.json_schema.schema_ if self.json_schema.schema_ is not None else {}}
            try:  # checked here so that the error names this request's field
                StructuredOutputsParams.from_value(constraint)
            except InvalidParams as exc:
                raise bad_request("response_format.json_schema.schema", exc.message) from None
            return constraint
        return None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None  # checked by lmport.engine.tool_calls, which names the bad field
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # several calls are always allowed
    # vLLM's extras
    chat_template: str | None = None
    add_generation_prompt: bool = True

    def sampling(self) -> tuple[dict[str, Any], dict[str, str]]:
        """SamplingParams fields, and the renames from their names to this request's (for error messages)."""
        self.check_common()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs", "top_logprobs requires logprobs to be true")
        params = self.common_sampling()
        response_format = self.response_format.structured_outputs() if self.response_format else None
        if response_format is not None:
            if self.structured_outputs is not None:
                raise bad_request("response_format", "give response_format or structured_outputs, not both")
            params["structured_outputs"] = response_format
        renames: dict[str, str] = {}
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
            renames["max_tokens"] = "max_completion_tokens" if self.max_completion_tokens is not None \
                else "max_tokens"
        if self.logprobs:
            params["logprobs"] = self.top_logprobs or 0
            renames["logprobs"] = "top_logprobs"
        return params, renames

    def template_messages(self) -> list[dict[str, Any]]:
        return template_messages(self.messages)


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    return [m.template_dict(j) for j, m in enumerate(messages)]


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template: str | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]
