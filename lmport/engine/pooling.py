"""Embeddings: how hidden states are pooled into one vector per input, shared by both engines.

Decoders (LLMEngine) pool through the scheduler: an embed request is a prefill-only request whose chunks each add
their part (`chunk_pool`) to a running value on the request; it finishes when its prompt is computed, instead of
sampling. Encoders (EncoderEngine) pool a padded batch at once (`pool_padded`). Both end in `finish_embedding`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lmport.engine.errors import InvalidParams
from lmport.engine.outputs import EmbeddingOutput
from lmport.engine.sampling_params import SamplingParams, check_token_ids
from lmport.engine.sequence import Request, Sequence

POOLING_TYPES = ("mean", "last", "cls")


@dataclass(slots=True, frozen=True)
class PoolingParams:
    pooling: str = "mean"  # mean over every token / the last token's hidden state / the first token's
    normalize: bool = True  # unit L2 norm (after truncation to `dimensions`)
    dimensions: int | None = None  # keep the first `dimensions` components (Matryoshka truncation)

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_TYPES:
            raise InvalidParams("pooling", f"must be one of {', '.join(POOLING_TYPES)}, got {self.pooling!r}")
        if not isinstance(self.normalize, bool):
            raise InvalidParams("normalize", f"must be a boolean, got {self.normalize!r}")
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int)
                                            or self.dimensions < 1):
            raise InvalidParams("dimensions", f"must be a positive integer, got {self.dimensions!r}")

    def verify_for_model(self, hidden_size: int) -> None:
        if self.dimensions is not None and self.dimensions > hidden_size:
            raise InvalidParams("dimensions", f"{self.dimensions} exceeds the model's embedding size {hidden_size}")


# An embed request needs no sampling; its SamplingParams only satisfies the shared Request/Sequence plumbing.
_NO_SAMPLING = SamplingParams(max_tokens=1, detokenize=False)


def make_embed_request(request_id: str, token_ids: list[int], text: str | None, params: PoolingParams,
                       on_output: Callable[[Any], None], *, max_model_len: int, vocab_size: int,
                       hidden_size: int) -> Request:
    """Validate one tokenized input (any thread); the engine runs it with add_request."""
    if not token_ids:
        raise InvalidParams("input", "the input is empty")
    if len(token_ids) > max_model_len:
        raise InvalidParams("input", f"the input has {len(token_ids)} tokens; max_model_len is {max_model_len}")
    token_ids = check_token_ids(token_ids, "input", vocab_size)
    params.verify_for_model(hidden_size)
    request = Request(request_id=request_id, prompt=text, prompt_token_ids=token_ids, params=_NO_SAMPLING,
                      on_output=on_output, pooling=params)
    request.seqs.append(Sequence(request=request, token_ids=list(token_ids), num_prompt_tokens=len(token_ids)))
    return request


def chunk_pool(hidden: torch.Tensor, pooling: str, start: int, end: int, num_tokens: int) -> torch.Tensor | None:
    """One prefill chunk's share of the pooled value: hidden is the chunk's rows [end - start, H], covering prompt
    positions start .. end - 1 of num_tokens. mean: their float32 sum; cls / last: the row, in the chunk that has it."""
    # Copies, never views: the rows may live in a CUDA graph's static output buffer, which the next step overwrites.
    if pooling == "mean":
        return hidden.sum(0, dtype=torch.float32)
    if pooling == "cls":
        return hidden[0].to(torch.float32, copy=True) if start == 0 else None
    return hidden[-1].to(torch.float32, copy=True) if end == num_tokens else None


def add_chunk(request: Request, part: torch.Tensor | None, start: int) -> None:
    """Accumulate a chunk's share; a chunk at position 0 starts over (a preempted request is recomputed)."""
    if start == 0:
        request.pooled = None
    if part is not None:
        request.pooled = part if request.pooled is None else request.pooled + part


def pooled_value(request: Request) -> torch.Tensor:
    assert request.pooled is not None and request.pooling is not None
    if request.pooling.pooling == "mean":
        return request.pooled / len(request.prompt_token_ids)
    return request.pooled


def pool_padded(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """hidden [B, L, H] of right-padded inputs, mask [B, L] (1 = real token) -> float32 [B, H]."""
    hidden = hidden.float()
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)
    if pooling == "cls":
        return hidden[:, 0]
    last = mask.sum(1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def finish_embedding(request: Request, vector: torch.Tensor) -> EmbeddingOutput:
    """Truncate to `dimensions`, normalize, and package the request's result (float32 values as Python floats)."""
    params = request.pooling
    assert params is not None
    if params.dimensions is not None:
        vector = vector[..., :params.dimensions]
    if params.normalize:
        vector = F.normalize(vector, dim=-1)
    return EmbeddingOutput(request_id=request.request_id, prompt=request.prompt,
                           prompt_token_ids=request.prompt_token_ids, embedding=vector.cpu().tolist(),
                           metrics=request.metrics)


def aborted_embedding(request: Request) -> EmbeddingOutput:
    return EmbeddingOutput(request_id=request.request_id, prompt=request.prompt,
                           prompt_token_ids=request.prompt_token_ids, embedding=None, metrics=request.metrics)
