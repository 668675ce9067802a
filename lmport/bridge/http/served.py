"""The models one server serves (`lmport serve --model a --model b`): each is a backend (a handle on the shared
service) with its names, and its own loading state, so that one model failing to load leaves the others serving."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from lmport.bridge.http.generation import Backend

logger = logging.getLogger("lmport.http")


@dataclass(eq=False)
class ServedModel:
    names: list[str]  # what a request's `model` may say; the first is reported
    root: str  # the model argument (a bundled name, a directory, a .gguf file, a hub id)
    backend: Backend
    ready: bool = False  # its first load succeeded: its handle exists (keep_alive may unload and reload it since)
    load_error: str | None = None

    def load(self) -> None:
        try:
            self.backend.load()
            self.ready = True
            logger.info("model %s ready as %s (max_model_len %d)", self.root, self.names, self.backend.max_model_len)
        except Exception as exc:  # noqa: BLE001 — reported by /health and every request for it, not a crash
            logger.exception("loading the model %s failed", self.root)
            self.load_error = f"{type(exc).__name__}: {exc}"

    def stats(self) -> dict[str, Any] | None:
        """Its engine's counters; None before its first load and while keep_alive has it unloaded (reading them
        must not load it)."""
        if not self.ready:
            return None
        stats = self.backend.stats()
        return stats if stats.get("loaded", True) else None

    def describe(self, created: int) -> list[dict[str, Any]]:
        """Its /v1/models entries, one per name (OpenAI's shape, vLLM's root and max_model_len, lmport's
        ready/loaded: ready once it has loaded once, loaded while its engine is in memory)."""
        loaded = self.stats() is not None
        max_model_len = self.backend.max_model_len if self.ready else None
        return [{"id": name, "object": "model", "created": created, "owned_by": "lmport", "root": self.root,
                 "parent": None, "max_model_len": max_model_len, "ready": self.ready, "loaded": loaded}
                for name in self.names]
