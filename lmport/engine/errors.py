"""Errors the engine raises; the bridge maps each class onto a protocol error code."""

from __future__ import annotations


class LMPortError(Exception):
    """Base class of every error lmport raises on purpose."""


class InvalidParams(LMPortError, ValueError):
    """A user-supplied value is out of range or of the wrong type; `field` names it. `index` is the position of the
    prompt it belongs to when several were submitted at once (LLM.add_requests)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.index: int | None = None


class ModelNotFound(LMPortError):
    """The model could not be found locally (no network lookups are made)."""


class UnsupportedModel(LMPortError):
    """The model's architecture has no native implementation."""


class OutOfKVCache(LMPortError):
    """A request can never fit the KV cache, or the cache cannot hold one sequence of max_model_len."""
