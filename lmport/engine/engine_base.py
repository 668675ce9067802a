"""What both engines (LLMEngine for decoders, EncoderEngine for encoders) share: the loaded model's facts, request
bookkeeping, and turning an input into a validated embed request."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from lmport.engine.config import EngineConfig
from lmport.engine.errors import InvalidParams
from lmport.engine.loader import LoadedModel
from lmport.engine.outputs import EmbeddingOutput
from lmport.engine.pooling import PoolingParams, make_embed_request
from lmport.engine.sampling_params import check_token_ids
from lmport.engine.sequence import Request

Prompt = str | list[int] | dict[str, Any]


class EngineBase:
    def __init__(self, config: EngineConfig, loaded: LoadedModel) -> None:
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.hf_config = loaded.hf_config
        self.model_path = loaded.model_path
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.vocab_size = loaded.vocab_size
        self.max_model_len = loaded.max_model_len
        self.requests: dict[str, Request] = {}
        self.counters: Counter[str] = Counter()

    def close(self) -> None:
        """Release what outlives the engine object otherwise (tensor-parallel ranks); the engine is not used after."""

    def make_embed_request(self, request_id: str, prompt: Prompt, params: PoolingParams,
                           on_output: Callable[[EmbeddingOutput], None]) -> Request:
        """An embed request (any thread): on a decoder it is prefilled with the running generations and pooled
        instead of sampled; on an encoder it joins a padded batch."""
        text, token_ids = tokenize_prompt(self.tokenizer, prompt)
        return make_embed_request(request_id, token_ids, text, params, on_output, max_model_len=self.max_model_len,
                                  vocab_size=self.vocab_size, hidden_size=self.hf_config.hidden_size)

    def _admit(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.counters["requests_total"] += 1
        self.counters["prompt_tokens_total"] += len(request.prompt_token_ids)


def tokenize_prompt(tokenizer: Any, prompt: Prompt) -> tuple[str | None, list[int]]:
    """A prompt (text, token ids, or a {prompt} / {prompt_token_ids} map) as (its text or None, its token ids)."""
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), check_token_ids(prompt["prompt_token_ids"], "prompt_token_ids")
        if "prompt" in prompt and isinstance(prompt["prompt"], str):
            return prompt["prompt"], tokenizer.encode(prompt["prompt"])
        raise InvalidParams("prompt", "a prompt map needs 'prompt' (text) or 'prompt_token_ids'")
    if isinstance(prompt, list):
        return None, check_token_ids(prompt, "prompt_token_ids")
    raise InvalidParams("prompt", f"expected text, a list of token ids or a map, got {type(prompt).__name__}")
