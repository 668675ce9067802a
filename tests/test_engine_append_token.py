"""LLMEngine._append_token's finish decisions: EOS, stop_token_ids (stop_reason = the token), min_tokens, length."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from lmport.engine.llm_engine import LLMEngine
from lmport.engine.sampler import SamplerOutput
from tests.engine_helpers import make_seq

EOS = 11


def bare_engine() -> tuple[LLMEngine, list[object]]:
    """An LLMEngine with just what _append_token needs (no model); returns it and the finished sequences."""
    finished: list[object] = []
    engine = object.__new__(LLMEngine)
    engine.counters, engine.eos_token_ids, engine.max_model_len = Counter(), {EOS}, 64
    engine.scheduler = SimpleNamespace(finish=finished.append)
    return engine, finished


def append(tokens: list[int], **params: object) -> tuple[str | None, int | str | None, int]:
    """Feed tokens until the sequence finishes; (finish_reason, stop_reason, number of output tokens)."""
    engine, finished = bare_engine()
    seq = make_seq([1, 2, 3], detokenize=False, **params)
    for token in tokens:
        engine._append_token(seq, SamplerOutput([token], [[]], [[]], [[]]), 0, 0.0)
        if finished:
            break
    return seq.finish_reason, seq.stop_reason, seq.num_output_tokens


@pytest.mark.parametrize("tokens, params, expected", [
    ([5, EOS, 6], {}, ("stop", None, 2)),
    ([5, EOS, 6], {"ignore_eos": True, "max_tokens": 3}, ("length", None, 3)),
    ([5, 7, 6], {"stop_token_ids": [7]}, ("stop", 7, 2)),
    ([5, EOS], {"stop_token_ids": [EOS]}, ("stop", EOS, 2)),  # both EOS and a stop token: the token is the reason
    ([7, 7, 6], {"stop_token_ids": [7], "min_tokens": 2}, ("stop", 7, 2)),  # the first 7 comes before min_tokens
    ([5, 6, 7], {"stop_token_ids": [8], "max_tokens": 3}, ("length", None, 3)),
    ([7, 5], {"stop_token_ids": [7], "ignore_eos": True}, ("stop", 7, 1)),
])
def test_finish_reasons(tokens: list[int], params: dict, expected: tuple) -> None:
    assert append(tokens, **params) == expected
