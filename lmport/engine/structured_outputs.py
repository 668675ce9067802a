"""Structured outputs: generation constrained to a JSON schema, any JSON object, a regex, a list of choices or an
EBNF grammar, enforced with xgrammar (the library vLLM, SGLang and TensorRT-LLM use for it).

Per engine, one `TokenizerInfo` and one `GrammarCompiler` (whose cache compiles each grammar once); per sequence,
one `GrammarMatcher`. Before sampling, each constrained row's matcher fills its row of a token bitmask and the
bitmask sets every disallowed logit to -inf; rows without a constraint are never touched. After sampling, the
matcher accepts the sampled token. Preemption keeps a sequence's tokens (its KV is recomputed, its tokens are not
resampled), so the matcher's state stays exact and nothing needs rolling back.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lmport.engine.errors import InvalidParams

if TYPE_CHECKING:
    import xgrammar

FIELD = "structured_outputs"
KINDS = ("json", "json_object", "regex", "choice", "grammar")
_XGRAMMAR_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[04:42:44] /project/cpp/x.cc:94: " before the message


@dataclass(slots=True, frozen=True)
class StructuredOutputsParams:
    """One constraint (exactly one of the KINDS), as vLLM's StructuredOutputsParams. `json` is kept as JSON text so
    that equal schemas share one compiled grammar."""
    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False

    @classmethod
    def from_value(cls, value: Any) -> StructuredOutputsParams:
        """From plain data ({"json": {...}} and so on); every problem is an InvalidParams naming the field."""
        if isinstance(value, StructuredOutputsParams):
            return value
        if not isinstance(value, dict):
            raise InvalidParams(FIELD, f"expected a map with one of {', '.join(KINDS)}, got {type(value).__name__}")
        unknown = sorted(set(value) - {*KINDS, "disable_any_whitespace"})
        if unknown:
            raise InvalidParams(f"{FIELD}.{unknown[0]}", f"unknown key; known: {', '.join(KINDS)}, "
                                "disable_any_whitespace")
        given = [k for k in KINDS if value.get(k) not in (None, False)]
        if len(given) != 1:
            raise InvalidParams(FIELD, f"give exactly one of {', '.join(KINDS)}, got "
                                f"{', '.join(given) if given else 'none'}")
        kind = given[0]
        whitespace = value.get("disable_any_whitespace", False)
        if not isinstance(whitespace, bool):
            raise InvalidParams(f"{FIELD}.disable_any_whitespace", f"expected a bool, got {whitespace!r}")
        checked = _CHECKS[kind](value[kind])
        return cls(**{kind: checked, "disable_any_whitespace": whitespace})

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def to_dict(self) -> dict[str, Any]:
        kind = self.kind
        value: Any = getattr(self, kind)
        if kind == "json":
            value = json.loads(value)
        elif kind == "choice":
            value = list(value)
        return {kind: value, "disable_any_whitespace": self.disable_any_whitespace}


def check_schema(schema: Any) -> str:
    where = f"{FIELD}.json"
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InvalidParams(where, f"the schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidParams(where, f"a JSON schema is an object, got {type(schema).__name__}")
    import jsonschema  # deferred: only constrained requests pay for the import

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        path = "/".join(str(p) for p in e.absolute_path)
        raise InvalidParams(where, f"invalid JSON schema{f' at {path}' if path else ''}: {e.message}") from None
    return json.dumps(schema, ensure_ascii=False)


def _check_text(kind: str) -> Any:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise InvalidParams(f"{FIELD}.{kind}", f"expected a non-empty string, got {value!r}")
        return value
    return check


def _check_choice(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) and c for c in value):
        raise InvalidParams(f"{FIELD}.choice", f"expected a non-empty list of non-empty strings, got {value!r}")
    return tuple(value)


def _check_json_object(value: Any) -> bool:
    if value is not True:
        raise InvalidParams(f"{FIELD}.json_object", f"expected true, got {value!r}")
    return True


_CHECKS = {"json": check_schema, "json_object": _check_json_object, "regex": _check_text("regex"),
           "choice": _check_choice, "grammar": _check_text("grammar")}


def choice_grammar(choices: tuple[str, ...]) -> str:
    """EBNF whose language is exactly the choices (JSON string escapes are EBNF string escapes)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


# The longest whitespace run allowed between JSON tokens. Unbounded, a small model at temperature 1.0 can spend its
# whole budget on newlines inside a valid prefix; 20 (llama.cpp's bound) still fits indented, pretty-printed JSON.
MAX_WHITESPACE_RUN = 20


class GrammarCompiler:
    """Compiles constraints against one tokenizer; built on first use (an engine that never sees a constrained
    request never imports xgrammar). Thread-safe: requests are validated on the callers' threads."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._lock = threading.Lock()

    def _xgrammar_compiler(self) -> xgrammar.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                import xgrammar

                info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                               stop_token_ids=self.stop_token_ids)
                self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=True)
            return self._compiler

    def compile(self, spec: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        """The compiled grammar (from xgrammar's cache when seen before); an invalid regex or grammar, or a schema
        xgrammar cannot express, is an InvalidParams with xgrammar's message."""
        compiler = self._xgrammar_compiler()
        kind = spec.kind
        try:
            if kind in ("json", "json_object"):  # json_object: an object, not any JSON value (as in OpenAI's API)
                schema = spec.json if kind == "json" else '{"type": "object"}'
                return compiler.compile_json_schema(schema, any_whitespace=not spec.disable_any_whitespace,
                                                    max_whitespace_cnt=MAX_WHITESPACE_RUN)
            if kind == "regex":
                return compiler.compile_regex(spec.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(spec.choice))
            return compiler.compile_grammar(spec.grammar)
        except RuntimeError as e:
            message = _XGRAMMAR_LOG_PREFIX.sub("", str(e).strip())
            raise InvalidParams(f"{FIELD}.{kind}", f"xgrammar cannot compile it: {message}") from None

    def matcher(self, spec: StructuredOutputsParams) -> xgrammar.GrammarMatcher:
        import xgrammar

        return xgrammar.GrammarMatcher(self.compile(spec))


class TokenBitmask:
    """A reusable bitmask buffer (int32, 32 tokens a word), grown when a step has more constrained rows."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.buffer: torch.Tensor | None = None

    def apply(self, logits: torch.Tensor, matchers: list[xgrammar.GrammarMatcher | None]) -> None:
        """Mask, in place, the logits of every row whose matcher is not None (logits: float32 [B, V] on CPU or
        the device; the bitmask is filled on the host)."""
        import xgrammar

        rows = [i for i, m in enumerate(matchers) if m is not None]
        if self.buffer is None or self.buffer.shape[0] < len(matchers):
            self.buffer = xgrammar.allocate_token_bitmask(max(len(matchers), 8), self.vocab_size)
        bitmask = self.buffer[:len(matchers)]
        for i in rows:
            matchers[i].fill_next_token_bitmask(bitmask, i)
        device_mask = bitmask if logits.device.type == "cpu" else bitmask.to(logits.device, non_blocking=True)
        xgrammar.apply_token_bitmask_inplace(logits, device_mask, vocab_size=self.vocab_size, indices=rows)
