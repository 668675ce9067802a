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


class Unsupported(LMPortError):
    """A recognised option or setting that lmport does not implement; `field` names it and the message says what to
    use instead (never silently ignored)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ModelNotFound(LMPortError):
    """The model is neither bundled, local, cached, nor downloadable from the hub."""


class UnsupportedModel(LMPortError):
    """The model's architecture has no native implementation."""


class OutOfKVCache(LMPortError):
    """A request can never fit the KV cache, or the cache cannot hold one sequence of max_model_len."""
