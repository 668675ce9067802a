"""lmport's inference engine: paged KV cache, continuous batching, prefix caching, chunked prefill.

Names are imported lazily, so that `import lmport.engine.config` (the manifest, the CLI) does not load torch and the model
code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "lmport.engine.llm", "RequestStream": "lmport.engine.llm", "EngineConfig": "lmport.engine.config",
    "SamplingParams": "lmport.engine.sampling_params", "RequestOutputKind": "lmport.engine.sampling_params",
    "RequestOutput": "lmport.engine.outputs", "CompletionOutput": "lmport.engine.outputs", "Logprob": "lmport.engine.outputs",
    "RequestMetrics": "lmport.engine.outputs", "LMPortError": "lmport.engine.errors", "InvalidParams": "lmport.engine.errors",
    "ModelNotFound": "lmport.engine.errors", "OutOfKVCache": "lmport.engine.errors", "UnsupportedModel": "lmport.engine.errors",
    "Unsupported": "lmport.engine.errors", "LoRARequest": "lmport.engine.lora",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmport.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
