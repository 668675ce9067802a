"""check_token_ids: the one token-id list check behind prompts, SamplingParams' id lists and detokenize."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lmport.engine.errors import InvalidParams
from lmport.engine.llm_engine import LLMEngine
from lmport.engine.sampling_params import SamplingParams, check_token_ids


def test_accepts_lists_and_tuples_of_ints() -> None:
    ids = [0, 5, 99]
    checked = check_token_ids(ids, "token_ids", 100)
    assert checked == ids and checked is not ids
    assert check_token_ids((1, 2), "token_ids") == [1, 2]
    assert check_token_ids([], "token_ids", 100) == []
    assert check_token_ids([10**9], "token_ids") == [10**9]  # no vocab_size: type check only


@pytest.mark.parametrize("value, message", [
    ([1, True], "expected a list of integer token ids, got True at index 1"),  # a bool is not a token id
    ([False], "expected a list of integer token ids, got False at index 0"),
    ([1, "2"], "expected a list of integer token ids, got '2' at index 1"),
    ([1.0], "expected a list of integer token ids, got 1.0 at index 0"),
    ("12", "expected a list of integer token ids, got str"),
    (7, "expected a list of integer token ids, got int"),
    (None, "expected a list of integer token ids, got NoneType"),
    ([3, 100], "token id 100 is outside the vocabulary [0, 100)"),
    ([-1], "token id -1 is outside the vocabulary [0, 100)"),
])
def test_rejects_naming_the_field(value: object, message: str) -> None:
    with pytest.raises(InvalidParams) as err:
        check_token_ids(value, "token_ids", 100)
    assert err.value.field == "token_ids"
    assert err.value.message == message


def test_sampling_params_use_it() -> None:
    for name in ("stop_token_ids", "allowed_token_ids"):
        with pytest.raises(InvalidParams, match="got True at index 0") as err:
            SamplingParams(**{name: [True]})
        assert err.value.field == name
        with pytest.raises(InvalidParams, match="token id 100 is outside") as err:
            SamplingParams(**{name: [100]}).verify_for_model(100, 20, 64)
        assert err.value.field == name


def bare_engine(vocab_size: int = 100) -> LLMEngine:
    """An LLMEngine with just what make_request needs (no model)."""
    engine = object.__new__(LLMEngine)
    engine.tokenizer = SimpleNamespace(encode=lambda text: [len(text) % vocab_size, 1])
    engine.vocab_size, engine.max_model_len, engine.device = vocab_size, 64, torch.device("cpu")
    engine.config = SimpleNamespace(max_logprobs=20)
    return engine


@pytest.mark.parametrize("prompt, message", [
    ([1, True], "got True at index 1"),
    ({"prompt_token_ids": [False]}, "got False at index 0"),
    ({"prompt_token_ids": "1 2"}, "got str"),
    ([5, 100], "token id 100 is outside the vocabulary [0, 100)"),
])
def test_engine_prompts_use_it(prompt: object, message: str) -> None:
    with pytest.raises(InvalidParams) as err:
        bare_engine().make_request("r", prompt, SamplingParams(detokenize=False), lambda output: None)
    assert err.value.field == "prompt_token_ids"
    assert message in err.value.message


def test_engine_range_check_applies_after_truncation() -> None:
    params = SamplingParams(detokenize=False, truncate_prompt_tokens=2)
    request = bare_engine().make_request("r", [500, 3, 4], params, lambda output: None)
    assert request.prompt_token_ids == [3, 4]
    assert bare_engine().make_request("r", "abc", SamplingParams(detokenize=False),
                                      lambda output: None).prompt_token_ids == [3, 1]
