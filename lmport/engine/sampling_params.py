"""Per-request sampling parameters with vLLM's names, defaults and validation.

Each field's metadata (doc, min, max, choices) is the single source of truth for validation messages, the manifest
(`sampling_params_schema`) and docs/sampling.md (`python -m lmport.engine.schema_docs` writes its table).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lmport.engine.config import field_schema, reject_unknown_keys
from lmport.engine.errors import InvalidParams
from lmport.engine.structured_outputs import StructuredOutputsParams

GREEDY_EPS = 1e-5  # temperature below this means greedy (argmax) sampling, as in vLLM
LOGIT_BIAS_LIMIT = 100.0
SEED_MAX = (1 << 53) - 1  # integers stay below 2^53 on the wire (JavaScript clients)
SEED_MIN = -SEED_MAX


class RequestOutputKind(enum.Enum):
    CUMULATIVE = "cumulative"  # every output carries the whole text / token list so far
    DELTA = "delta"  # every output carries only what is new since the previous one
    FINAL_ONLY = "final_only"  # a single output, when the request finishes


def _param(default: Any, doc: str, **limits: Any) -> Any:
    return field(default=default, metadata={"doc": doc, **limits})


@dataclass(slots=True)
class SamplingParams:
    n: int = _param(1, "Number of completions to return for the prompt; they share the prompt's KV blocks.", min=1)
    temperature: float = _param(1.0, "Randomness of sampling; below 1e-5 means greedy (argmax), and then n must "
                                "be 1.", min=0.0, max=2.0)
    top_p: float = _param(1.0, "Nucleus sampling: keep the most likely tokens whose cumulative probability reaches "
                          "top_p; 1 disables it.", min=0.0, max=1.0, exclusive_min=True)
    top_k: int = _param(0, "Keep only the top_k most likely tokens (ties at the boundary are kept); 0 or -1 disables "
                        "it.", min=-1)
    min_p: float = _param(0.0, "Drop tokens whose probability is below min_p times the most likely token's; "
                          "0 disables it.", min=0.0, max=1.0)
    presence_penalty: float = _param(0.0, "Subtracted from the logit of every token already present in the output.",
                                     min=-2.0, max=2.0)
    frequency_penalty: float = _param(0.0, "Subtracted from a token's logit once per occurrence in the output.",
                                      min=-2.0, max=2.0)
    repetition_penalty: float = _param(1.0, "Tokens seen in the prompt or output get positive logits divided and "
                                       "negative logits multiplied by it; 1 disables it.", min=0.0, exclusive_min=True)
    seed: int | None = _param(None, "Seed of this request's own generator: the same seed gives the same tokens "
                              "whatever else is batched with it; -1 means no seed.", min=SEED_MIN, max=SEED_MAX)
    stop: str | list[str] | None = _param(None, "Strings that end the completion when generated (found across token "
                                          "boundaries); the text is cut before the stop string.")
    stop_token_ids: list[int] | None = _param(None, "Token ids that end the completion when sampled.")
    ignore_eos: bool = _param(False, "Keep generating after the end-of-sequence token.")
    max_tokens: int = _param(16, "Most tokens to generate per completion.", min=1)
    min_tokens: int = _param(0, "Fewest tokens to generate before EOS, stop_token_ids or stop strings can end the "
                             "completion; at most max_tokens.", min=0)
    logprobs: int | None = _param(None, "Return the log-probabilities of this many most likely tokens, plus the "
                                  "sampled one, at each generated position (at most the engine's max_logprobs, "
                                  "default 20).", min=0)
    prompt_logprobs: int | None = _param(None, "Return this many most likely tokens, plus the prompt's own token, "
                                         "at each prompt position (None at position 0).", min=0)
    detokenize: bool = _param(True, "Turn generated tokens into text; stop strings need it.")
    skip_special_tokens: bool = _param(True, "Leave special tokens (e.g. <|im_end|>) out of the output text.")
    spaces_between_special_tokens: bool = _param(True, "Let the tokenizer's decoder put spaces between adjacent "
                                                 "special tokens; false joins them without spaces.")
    include_stop_str_in_output: bool = _param(False, "Keep the matched stop string (or stop token's text) at the "
                                              "end of the output text.")
    logit_bias: dict[int, float] | None = _param(None, "Token id -> bias added to its logit before sampling; values "
                                                 "are clamped to [-100, 100].")
    allowed_token_ids: list[int] | None = _param(None, "Only these token ids may be sampled.")
    bad_words: list[str] | None = _param(None, "Words that must not be generated: the last token of a word is "
                                         "banned whenever the output ends with the rest of it.")
    truncate_prompt_tokens: int | None = _param(None, "Keep only the last this-many prompt tokens.", min=1)
    output_kind: RequestOutputKind = _param(RequestOutputKind.CUMULATIVE, "What each streamed output carries: "
                                            "'cumulative' (everything so far), 'delta' (only the new part) or "
                                            "'final_only' (one output at the end).",
                                            choices=[k.value for k in RequestOutputKind])
    structured_outputs: StructuredOutputsParams | None = _param(
        None, "Constrain the output, as vLLM does (with xgrammar): a map with exactly one of 'json' (a JSON schema, "
        "as a map or as JSON text), 'json_object' (true: any JSON object), 'regex', 'choice' (a list of strings) or "
        "'grammar' (EBNF / GBNF), plus 'disable_any_whitespace' (JSON without free whitespace). The completion "
        "finishes with 'stop' only when the constraint is complete, else 'length'. Alias: guided_decoding.")

    def __post_init__(self) -> None:
        if self.seed == -1:
            self.seed = None
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        if isinstance(self.output_kind, str):
            try:
                self.output_kind = RequestOutputKind(self.output_kind)
            except ValueError:
                raise InvalidParams("output_kind", f"must be one of {_metadata('output_kind')['choices']}, "
                                    f"got {self.output_kind!r}") from None
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_value(f, getattr(self, f.name)))
        self._check_relations()
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            self.logit_bias = {k: max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, v)) for k, v in self.logit_bias.items()}
        if self.is_greedy:  # the truncations cannot change an argmax; dropping them keeps the sampler's fast path
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _check_relations(self) -> None:
        if self.min_tokens > self.max_tokens:
            raise InvalidParams("min_tokens", f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.is_greedy and self.n > 1:
            raise InvalidParams("n", f"must be 1 for greedy sampling (temperature < {GREEDY_EPS}), got {self.n}")
        if self.stop is not None and any(s == "" for s in self.stop):
            raise InvalidParams("stop", "stop strings must not be empty")
        if self.stop and not self.detokenize:
            raise InvalidParams("stop", "stop strings need detokenize=True")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise InvalidParams("allowed_token_ids", "must not be empty (None allows every token)")
        if self.bad_words is not None and any(not w.strip() for w in self.bad_words):
            raise InvalidParams("bad_words", "bad words must not be empty or blank")

    # --- derived views the engine and sampler use ---

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def verify_for_model(self, vocab_size: int, max_logprobs: int, max_model_len: int) -> None:
        """Checks that need the model: token ids inside [0, vocab_size), logprob counts, prompt truncation."""
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > max_logprobs:
                raise InvalidParams(name, f"must be in [0, max_logprobs={max_logprobs}], got {value}")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens > max_model_len:
            raise InvalidParams("truncate_prompt_tokens", f"must be in [1, max_model_len={max_model_len}], "
                                f"got {self.truncate_prompt_tokens}")
        for name in ("stop_token_ids", "allowed_token_ids", "logit_bias"):
            ids = getattr(self, name)
            if ids is not None:
                check_token_ids(list(ids), name, vocab_size)

    def bad_words_token_ids(self, tokenizer: Any) -> list[list[int]]:
        """Tokenize bad_words as vLLM does: each word alone and, when that gives a different first token of the
        same length, with a leading space (the form it takes inside text)."""
        sequences: list[list[int]] = []
        for word in self.bad_words or ():
            plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            sequences.append(plain)
            if spaced[0] != plain[0] and len(spaced) == len(plain):
                sequences.append(spaced)
        return sequences

    # --- plain data ---

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> SamplingParams:
        """Build from plain data; unknown keys are rejected by name, and None means "the default"."""
        if "guided_decoding" in params:  # vLLM's older name of structured_outputs
            if params.get("structured_outputs") is not None:
                raise InvalidParams("guided_decoding", "give structured_outputs or its alias guided_decoding, "
                                    "not both")
            params = {**params, "structured_outputs": params["guided_decoding"]}
            del params["guided_decoding"]
        reject_unknown_keys(params, cls, "sampling parameter")
        return cls(**{k: v for k, v in params.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["output_kind"] = self.output_kind.value
        if self.structured_outputs is not None:
            data["structured_outputs"] = self.structured_outputs.to_dict()
        return data

    def clone(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)


def sampling_params_schema() -> list[dict[str, Any]]:
    """Every sampling parameter as {name, type, required, default, doc, choices?, min?, max?, exclusive_min?} for the
    manifest (exclusive_min: true means the value must be > min)."""
    entries = [field_schema(f, SamplingParams) for f in dataclasses.fields(SamplingParams)]
    for entry in entries:
        if entry["name"] == "output_kind":
            entry["type"] = "str"  # travels as the enum's value
        elif entry["name"] == "structured_outputs":
            entry["type"] = "dict|null"  # travels as plain data
    return entries


def _metadata(name: str) -> Mapping[str, Any]:
    return next(f.metadata for f in dataclasses.fields(SamplingParams) if f.name == name)


# --- value checks, driven by the field annotations and metadata ---

_INT_LISTS = {"stop_token_ids", "allowed_token_ids"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_token_ids(value: Any, field: str, vocab_size: int | None = None) -> list[int]:
    """The one check of a token-id list (prompt_token_ids, stop_token_ids, allowed_token_ids, logit_bias keys,
    detokenize's input): a list or tuple of integers (a bool is not a token id), each inside [0, vocab_size) when
    vocab_size is given. Returns the ids as a new list; raises InvalidParams naming `field`."""
    if not isinstance(value, (list, tuple)):
        raise InvalidParams(field, f"expected a list of integer token ids, got {type(value).__name__}")
    for index, token in enumerate(value):
        if not _is_int(token):
            raise InvalidParams(field, f"expected a list of integer token ids, got {token!r} at index {index}")
    if vocab_size is not None:
        bad = next((t for t in value if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidParams(field, f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return list(value)


def _check_value(f: dataclasses.Field, value: Any) -> Any:
    """Type- and range-check one field; returns the value normalized (ints widened to float for float fields)."""
    if value is None:
        if f.default is None:
            return None
        raise InvalidParams(f.name, f"must not be None (default {f.default!r})")
    kind = type(f.default) if f.default is not None else None
    name = f.name
    if name in _INT_LISTS:
        return check_token_ids(value, name)
    if name in ("stop", "bad_words"):
        if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
            raise InvalidParams(name, f"expected a string or a list of strings, got {value!r}")
        return list(value)
    if name == "logit_bias":
        return _check_logit_bias(value)
    if name == "output_kind":
        return value
    if name == "structured_outputs":
        return StructuredOutputsParams.from_value(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise InvalidParams(name, f"expected a bool, got {type(value).__name__} {value!r}")
        return value
    if kind is float:
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)) or math.isnan(value):
            raise InvalidParams(name, f"expected a number, got {type(value).__name__} {value!r}")
        value = float(value)
    elif not _is_int(value):
        raise InvalidParams(name, f"expected an integer, got {type(value).__name__} {value!r}")
    low, high = f.metadata.get("min"), f.metadata.get("max")
    open_low = f.metadata.get("exclusive_min", False)  # the value must be > min (the manifest carries the flag too)
    if (low is not None and (value <= low if open_low else value < low)) or (high is not None and value > high):
        if high is None:
            raise InvalidParams(name, f"must be {'>' if open_low else '>='} {low}, got {value!r}")
        raise InvalidParams(name, f"must be in {'(' if open_low else '['}{low}, {high}], got {value!r}")
    return value


def _check_logit_bias(value: Any) -> dict[int, float]:
    if not isinstance(value, dict):
        raise InvalidParams("logit_bias", f"expected a map of token id -> bias, got {type(value).__name__}")
    bias: dict[int, float] = {}
    for key, amount in value.items():
        try:  # JSON object keys arrive as strings ("50256"), as in the OpenAI API
            token = int(key) if not isinstance(key, bool) else None
        except (TypeError, ValueError):
            token = None
        if token is None or (isinstance(key, float) and key != token):
            raise InvalidParams("logit_bias", f"keys must be integer token ids, got {key!r}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or math.isnan(amount):
            raise InvalidParams("logit_bias", f"bias of token {token} must be a number, got {amount!r}")
        bias[token] = float(amount)
    return bias
