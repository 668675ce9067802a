"""lmport's inference engine: paged KV cache, continuous batching, prefix caching, chunked prefill."""

from engine.config import EngineConfig
from engine.errors import InvalidParams, LMPortError, ModelNotFound, OutOfKVCache, UnsupportedModel
from engine.llm import LLM, RequestStream
from engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["LLM", "RequestStream", "EngineConfig", "SamplingParams", "RequestOutputKind", "RequestOutput",
           "CompletionOutput", "Logprob", "RequestMetrics", "LMPortError", "InvalidParams", "ModelNotFound",
           "OutOfKVCache", "UnsupportedModel"]

__version__ = "0.1.0"
