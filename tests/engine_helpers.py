"""Small builders shared by the engine unit tests (no model needed)."""

from __future__ import annotations

from lmport.engine.sampling_params import SamplingParams
from lmport.engine.sequence import Request, Sequence


def make_seq(token_ids: list[int], request_id: str = "r", **params: object) -> Sequence:
    request = Request(request_id=request_id, prompt=None, prompt_token_ids=list(token_ids),
                      params=SamplingParams(**params), on_output=lambda output: None)
    seq = Sequence(request=request, token_ids=list(token_ids), num_prompt_tokens=len(token_ids))
    request.seqs.append(seq)
    return seq


def compute(seq: Sequence, num_tokens: int) -> None:
    """Pretend the model ran: the next num_tokens tokens now have K/V in the cache."""
    seq.num_computed_tokens += num_tokens
