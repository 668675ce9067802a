"""lmport's inference engine: paged KV cache, continuous batching, prefix caching, chunked prefill.

Names are imported lazily, so that `import engine.config` (the manifest, the CLI) does not load torch and the model
code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "engine.llm", "RequestStream": "engine.llm", "EngineConfig": "engine.config",
    "SamplingParams": "engine.sampling_params", "RequestOutputKind": "engine.sampling_params",
    "RequestOutput": "engine.outputs", "CompletionOutput": "engine.outputs", "Logprob": "engine.outputs",
    "RequestMetrics": "engine.outputs", "LMPortError": "engine.errors", "InvalidParams": "engine.errors",
    "ModelNotFound": "engine.errors", "OutOfKVCache": "engine.errors", "UnsupportedModel": "engine.errors",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
