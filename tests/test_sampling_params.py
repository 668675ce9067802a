"""SamplingParams: vLLM names and defaults, every validation rule with its message, plain-data round trip."""

from __future__ import annotations

import json

import pytest

from lmport.engine.errors import InvalidParams
from lmport.engine.sampling_params import RequestOutputKind, SamplingParams, sampling_params_schema

VLLM_DEFAULTS = {
    "n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "presence_penalty": 0.0,
    "frequency_penalty": 0.0, "repetition_penalty": 1.0, "seed": None, "stop": None, "stop_token_ids": None,
    "ignore_eos": False, "max_tokens": 16, "min_tokens": 0, "logprobs": None, "prompt_logprobs": None,
    "detokenize": True, "skip_special_tokens": True, "spaces_between_special_tokens": True,
    "include_stop_str_in_output": False, "logit_bias": None, "allowed_token_ids": None, "bad_words": None,
    "truncate_prompt_tokens": None, "output_kind": "cumulative", "structured_outputs": None,
}


def test_defaults_are_vllms() -> None:
    assert SamplingParams().to_dict() == VLLM_DEFAULTS


@pytest.mark.parametrize("kwargs, field, message", [
    ({"n": 0}, "n", "must be >= 1, got 0"),
    ({"temperature": -0.1}, "temperature", "must be in [0.0, 2.0], got -0.1"),
    ({"temperature": 2.5}, "temperature", "must be in [0.0, 2.0], got 2.5"),
    ({"temperature": 0.0, "n": 2}, "n", "must be 1 for greedy sampling"),
    ({"top_p": 0.0}, "top_p", "must be in (0.0, 1.0], got 0.0"),
    ({"top_p": 1.5}, "top_p", "must be in (0.0, 1.0], got 1.5"),
    ({"top_k": -2}, "top_k", "must be >= -1, got -2"),
    ({"top_k": 2.5}, "top_k", "expected an integer, got float 2.5"),
    ({"top_k": True}, "top_k", "expected an integer, got bool"),
    ({"min_p": 1.1}, "min_p", "must be in [0.0, 1.0], got 1.1"),
    ({"min_p": -0.1}, "min_p", "must be in [0.0, 1.0]"),
    ({"presence_penalty": 2.1}, "presence_penalty", "must be in [-2.0, 2.0], got 2.1"),
    ({"frequency_penalty": -2.1}, "frequency_penalty", "must be in [-2.0, 2.0], got -2.1"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "must be > 0.0, got 0.0"),
    ({"repetition_penalty": -1.0}, "repetition_penalty", "must be > 0.0, got -1.0"),
    ({"max_tokens": 0}, "max_tokens", "must be >= 1, got 0"),
    ({"min_tokens": -1}, "min_tokens", "must be >= 0, got -1"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens", "must be in [0, max_tokens=4], got 5"),
    ({"logprobs": -1}, "logprobs", "must be >= 0, got -1"),
    ({"prompt_logprobs": -1}, "prompt_logprobs", "must be >= 0, got -1"),
    ({"stop": ""}, "stop", "stop strings must not be empty"),
    ({"stop": ["ok", ""]}, "stop", "stop strings must not be empty"),
    ({"stop": [1]}, "stop", "expected a string or a list of strings"),
    ({"stop": ["x"], "detokenize": False}, "stop", "stop strings need detokenize=True"),
    ({"stop_token_ids": [1, "2"]}, "stop_token_ids", "expected a list of integer token ids"),
    ({"allowed_token_ids": []}, "allowed_token_ids", "must not be empty"),
    ({"bad_words": [" "]}, "bad_words", "must not be empty or blank"),
    ({"logit_bias": {"x": 1.0}}, "logit_bias", "keys must be integer token ids, got 'x'"),
    ({"logit_bias": {3: "big"}}, "logit_bias", "bias of token 3 must be a number"),
    ({"logit_bias": [1]}, "logit_bias", "expected a map of token id -> bias"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "must be >= 1, got 0"),
    ({"ignore_eos": 1}, "ignore_eos", "expected a bool, got int 1"),
    ({"temperature": "hot"}, "temperature", "expected a number, got str 'hot'"),
    ({"temperature": None}, "temperature", "must not be None"),
    ({"output_kind": "stream"}, "output_kind", "must be one of ['cumulative', 'delta', 'final_only']"),
])
def test_validation_names_field_and_range(kwargs: dict, field: str, message: str) -> None:
    with pytest.raises(InvalidParams) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field
    assert message in str(info.value)
    assert str(info.value).startswith(f"{field}: ")


@pytest.mark.parametrize("kwargs, field, message", [
    ({"logprobs": 21}, "logprobs", "must be in [0, max_logprobs=20], got 21"),
    ({"prompt_logprobs": 30}, "prompt_logprobs", "must be in [0, max_logprobs=20], got 30"),
    ({"stop_token_ids": [5, 100]}, "stop_token_ids", "token id 100 is outside the vocabulary [0, 100)"),
    ({"allowed_token_ids": [-1]}, "allowed_token_ids", "token id -1 is outside the vocabulary [0, 100)"),
    ({"logit_bias": {100: 1.0}}, "logit_bias", "token id 100 is outside the vocabulary [0, 100)"),
    ({"truncate_prompt_tokens": 65}, "truncate_prompt_tokens", "must be in [1, max_model_len=64], got 65"),
])
def test_verify_for_model(kwargs: dict, field: str, message: str) -> None:
    params = SamplingParams(**kwargs)
    with pytest.raises(InvalidParams) as info:
        params.verify_for_model(vocab_size=100, max_logprobs=20, max_model_len=64)
    assert info.value.field == field
    assert message in str(info.value)


def test_verify_for_model_accepts_in_range() -> None:
    SamplingParams(logprobs=20, prompt_logprobs=0, stop_token_ids=[0, 99], allowed_token_ids=[1],
                   logit_bias={99: 1.0}, truncate_prompt_tokens=64).verify_for_model(100, 20, 64)


def test_unknown_field_rejected_by_name() -> None:
    with pytest.raises(InvalidParams) as info:
        SamplingParams.from_dict({"temperature": 0.5, "top_pp": 0.9})
    assert info.value.field == "top_pp"
    assert "unknown sampling parameter; did you mean 'top_p'?" in str(info.value)
    with pytest.raises(TypeError):  # the constructor too: a typo never passes silently
        SamplingParams(top_pp=0.9)  # type: ignore[call-arg]


def test_normalizations() -> None:
    params = SamplingParams(stop="###", top_k=-1, seed=-1, logit_bias={"7": 250, 8: -1e9, 9: 3},
                            output_kind="delta", temperature=1)
    assert params.stop == ["###"]
    assert params.top_k == 0
    assert params.seed is None
    assert params.logit_bias == {7: 100.0, 8: -100.0, 9: 3.0}  # clamped to [-100, 100]
    assert params.output_kind is RequestOutputKind.DELTA
    assert isinstance(params.temperature, float)


def test_greedy_threshold_and_truncations_dropped() -> None:
    greedy = SamplingParams(temperature=0.9e-5, top_p=0.5, top_k=3, min_p=0.2)
    assert greedy.is_greedy
    assert (greedy.top_p, greedy.top_k, greedy.min_p) == (1.0, 0, 0.0)
    assert not SamplingParams(temperature=1e-5).is_greedy
    SamplingParams(temperature=1e-5, n=3)  # not greedy: n > 1 is fine


def test_round_trip_through_json() -> None:
    params = SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=5, stop=["a", "b"], stop_token_ids=[3],
                            logprobs=2, logit_bias={5: 1.5}, output_kind=RequestOutputKind.FINAL_ONLY, seed=7)
    data = json.loads(json.dumps(params.to_dict()))
    assert data["output_kind"] == "final_only"
    assert SamplingParams.from_dict(data) == params


def test_from_dict_none_means_default() -> None:
    assert SamplingParams.from_dict({"temperature": None, "seed": None}) == SamplingParams()


def test_schema_matches_fields() -> None:
    schema = {entry["name"]: entry for entry in sampling_params_schema()}
    assert list(schema) == list(VLLM_DEFAULTS)
    assert schema["temperature"] == {"name": "temperature", "type": "float", "required": False, "default": 1.0,
                                     "doc": schema["temperature"]["doc"], "min": 0.0, "max": 2.0}
    assert schema["stop"]["type"] == "str|list[str]|null"
    assert schema["output_kind"]["type"] == "str"
    assert schema["output_kind"]["choices"] == ["cumulative", "delta", "final_only"]
    assert schema["output_kind"]["default"] == "cumulative"
    assert all(entry["doc"] for entry in schema.values())
    json.dumps(list(schema.values()))


class _WordTokenizer:
    """Splits on characters; a leading space joins the first character (like byte-level BPE's 'Ġ')."""
    vocab: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        pieces = [text[:2]] + list(text[2:]) if text.startswith(" ") else list(text)
        return [self.vocab.setdefault(p, len(self.vocab)) for p in pieces]


def test_bad_words_tokenized_with_and_without_leading_space() -> None:
    tokenizer = _WordTokenizer()
    ids = SamplingParams(bad_words=["ab", " c"]).bad_words_token_ids(tokenizer)
    a, b, c = (tokenizer.vocab[ch] for ch in "abc")
    assert ids == [[a, b], [tokenizer.vocab[" a"], b], [c], [tokenizer.vocab[" c"]]]
