"""IncrementalDetokenizer with the bundled SmolLM2 tokenizer (byte-level BPE): exact text, never a partial
character, special tokens, stop strings across token boundaries with hold-back."""

from __future__ import annotations

import random
import time

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lmport.engine.detokenizer import IncrementalDetokenizer
from lmport.engine.loader import resolve_model
from lmport.engine.sampling_params import SamplingParams

IM_END, IM_START = 2, 1


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model("smollm2"))


def stream(tok: PreTrainedTokenizerBase, prompt: str, output_ids: list[int], **params: object) \
        -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed output_ids one at a time; returns the detokenizer, the delta texts and the stop string (if any)."""
    detok = IncrementalDetokenizer(tok, SamplingParams(**params), tok.encode(prompt))
    deltas, stop = [], None
    for i, token_id in enumerate(output_ids):
        stop = detok.update([token_id])
        deltas.append(detok.get_next_output_text(finished=stop is not None or i == len(output_ids) - 1, delta=True))
        if stop is not None:
            break
    return detok, deltas, stop


TEXTS = ["Hello world, this is plain ASCII text.",
         " café naïve résumé — “quotes” and ½ fractions",
         "中文字符和日本語のテキスト、한국어도",
         "emoji 🙂🎉👩‍👩‍👧 and flags 🇫🇷 mixed with text",
         "  leading spaces\n\ttabs\nand newlines  "]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(tok: PreTrainedTokenizerBase, text: str) -> None:
    ids = tok.encode(text)
    detok, deltas, _ = stream(tok, "Say:", ids)
    assert "".join(deltas) == detok.output_text == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_character_split_over_tokens_is_held_until_complete(tok: PreTrainedTokenizerBase) -> None:
    ids = tok.encode("世")
    assert len(ids) == 2 and tok.decode(ids[:1]).endswith("\ufffd")  # byte-fallback halves
    detok = IncrementalDetokenizer(tok, SamplingParams(), tok.encode("x"))
    detok.update(ids[:1])
    assert detok.output_text == "" and detok.get_next_output_text(False, True) == ""
    detok.update(ids[1:])
    assert detok.output_text == "世"


def test_random_tokens_match_full_decode(tok: PreTrainedTokenizerBase) -> None:
    rng = random.Random(0)
    prompt_ids = tok.encode("Start.")
    for _ in range(20):
        # Byte-fallback tokens (ids of single bytes >= 0x80) often, to produce broken and completed characters.
        ids = [rng.choice([rng.randrange(17, len(tok)), rng.randrange(170, 260)]) for _ in range(30)]
        detok = IncrementalDetokenizer(tok, SamplingParams(), prompt_ids)
        for token_id in ids:
            detok.update([token_id])
        final = detok.get_next_output_text(finished=True, delta=False)
        assert final == tok.decode(prompt_ids + ids)[len(tok.decode(prompt_ids)):]


def test_skip_special_tokens(tok: PreTrainedTokenizerBase) -> None:
    ids = tok.encode("Hi") + [IM_END, IM_START] + tok.encode("there")
    skipped, _, _ = stream(tok, "p", ids)
    assert skipped.output_text == "Hithere"
    kept, _, _ = stream(tok, "p", ids, skip_special_tokens=False)
    assert kept.output_text == "Hi<|im_end|><|im_start|>there" == tok.decode(ids)
    raw, _, _ = stream(tok, "p", ids, skip_special_tokens=False, spaces_between_special_tokens=False)
    assert raw.output_text == "Hi<|im_end|><|im_start|>there"


def test_stop_string_split_across_tokens(tok: PreTrainedTokenizerBase) -> None:
    ids = tok.encode("Hello world. The end")  # 'Hello', ' world', '.', ' The', ' end'
    detok, deltas, stop = stream(tok, "p", ids, stop=["ld. T"])
    assert stop == "ld. T"
    assert detok.output_text == "Hello wor" == "".join(deltas)
    assert len(deltas) == 4  # matched at ' The', the fourth token


def test_include_stop_str_in_output(tok: PreTrainedTokenizerBase) -> None:
    ids = tok.encode("Hello world. The end")
    detok, deltas, stop = stream(tok, "p", ids, stop=["ld. T"], include_stop_str_in_output=True)
    assert stop == "ld. T"
    assert detok.output_text == "Hello world. T" == "".join(deltas)  # the rest of ' The' is cut


def test_stop_string_inside_one_token_cuts_the_token(tok: PreTrainedTokenizerBase) -> None:
    ids = tok.encode("Hello world")
    assert stream(tok, "p", ids, stop=["or"])[0].output_text == "Hello w"
    assert stream(tok, "p", ids, stop=["or"], include_stop_str_in_output=True)[0].output_text == "Hello wor"


def test_earliest_stop_string_wins(tok: PreTrainedTokenizerBase) -> None:
    detok, _, stop = stream(tok, "p", tok.encode("one two three"), stop=["three", "two", "e t"])
    assert stop == "e t" and detok.output_text == "on"


def test_hold_back_never_emits_a_possible_stop_start(tok: PreTrainedTokenizerBase) -> None:
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=["###"]), tok.encode("p"))
    detok.update(tok.encode("a b #"))  # the '#' could start '###'
    assert detok.get_next_output_text(False, delta=True) == "a b "
    assert detok.get_next_output_text(False, delta=False) == "a b "
    detok.update(tok.encode("#"))
    assert detok.get_next_output_text(False, delta=True) == ""  # '##' still could
    assert detok.update(tok.encode(" x")) is None  # '## x' cannot any more
    assert detok.get_next_output_text(False, delta=True) == "## x"
    assert detok.output_text == "a b ## x"


def test_hold_back_released_when_finished(tok: PreTrainedTokenizerBase) -> None:
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=["###"]), tok.encode("p"))
    detok.update(tok.encode("end #"))
    assert detok.get_next_output_text(False, delta=True) == "end "
    assert detok.get_next_output_text(True, delta=True) == "#"


def test_no_hold_back_when_stop_string_is_kept(tok: PreTrainedTokenizerBase) -> None:
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=["###"], include_stop_str_in_output=True),
                                   tok.encode("p"))
    detok.update(tok.encode("a b #"))
    assert detok.get_next_output_text(False, delta=True) == "a b #"


def test_streamed_deltas_equal_final_text_with_stops(tok: PreTrainedTokenizerBase) -> None:
    text = "alpha beta gamma delta epsilon zeta eta theta"
    for stop in (["eta"], ["ma d", "zz"], ["a b"], ["theta"], ["nothing"]):
        for include in (False, True):
            detok, deltas, _ = stream(tok, "p", tok.encode(text), stop=stop, include_stop_str_in_output=include)
            assert "".join(deltas) == detok.output_text, (stop, include)


def test_stop_strings_ignored_within_min_tokens(tok: PreTrainedTokenizerBase) -> None:
    ids = tok.encode("stop here, stop there")  # 'stop', ' here', ',', ' stop', ' there'
    detok, _, stop = stream(tok, "p", ids, stop=["stop"], min_tokens=2, max_tokens=16)
    assert stop == "stop" and detok.output_text == "stop here, "


def test_stop_terminated_token_text_dropped_unless_included(tok: PreTrainedTokenizerBase) -> None:
    ids = tok.encode("Hi.")  # 'Hi', '.'
    detok = IncrementalDetokenizer(tok, SamplingParams(stop_token_ids=[ids[-1]]), tok.encode("p"))
    detok.update(ids[:-1])
    detok.update(ids[-1:], stop_terminated=True)
    assert detok.output_text == "Hi"
    kept = IncrementalDetokenizer(tok, SamplingParams(stop_token_ids=[ids[-1]], include_stop_str_in_output=True),
                                  tok.encode("p"))
    kept.update(ids[:-1])
    kept.update(ids[-1:], stop_terminated=True)
    assert kept.output_text == "Hi."


def test_cumulative_and_delta_views(tok: PreTrainedTokenizerBase) -> None:
    detok = IncrementalDetokenizer(tok, SamplingParams(), tok.encode("p"))
    detok.update(tok.encode("one two"))
    assert detok.get_next_output_text(False, delta=False) == "one two"
    assert detok.get_next_output_text(False, delta=True) == "one two"
    detok.update(tok.encode(" three"))
    assert detok.get_next_output_text(False, delta=True) == " three"
    assert detok.get_next_output_text(False, delta=True) == ""
    assert detok.get_next_output_text(True, delta=False) == "one two three"


def test_cheap_per_token(tok: PreTrainedTokenizerBase) -> None:
    ids = tok.encode(" ".join(TEXTS) * 20)
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=["never appears", "xyz"]), tok.encode("p"))
    start = time.perf_counter()
    for token_id in ids:
        detok.update([token_id])
        detok.get_next_output_text(False, delta=True)
    per_token = (time.perf_counter() - start) / len(ids)
    assert per_token < 1e-3  # ~20 us on an idle core; the bound leaves room for a loaded machine
    assert len(detok.ids) <= 30  # the decode window stays short


def reference_stop(tok: PreTrainedTokenizerBase, ids: list[int], stops: list[str], include: bool) -> str:
    """The first token boundary at which the decoded text contains a stop string; cut at the earliest match."""
    for end in range(1, len(ids) + 1):
        text = tok.decode(ids[:end])
        matches = [(text.find(s), i) for i, s in enumerate(stops) if s in text]
        if matches:
            index, which = min(matches)
            return text[:index + len(stops[which])] if include else text[:index]
    return tok.decode(ids)


def test_stop_strings_and_hold_back_randomized(tok: PreTrainedTokenizerBase) -> None:
    rng = random.Random(1)
    alphabet = ["a", "b", "ab", " ", "#", "##", "\n", "世", "é", "🙂", "ba"]
    for _ in range(150):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(4, 25)))
        ids = tok.encode(text)
        stops = []
        for _ in range(rng.randrange(1, 3)):
            start = rng.randrange(len(text))
            stops.append(text[start:start + rng.randrange(1, 5)] if rng.random() < 0.7
                         else "".join(rng.choice(alphabet) for _ in range(2)))
        include = rng.random() < 0.5
        detok = IncrementalDetokenizer(tok, SamplingParams(stop=stops, include_stop_str_in_output=include),
                                       tok.encode("p"))
        sent = ""
        for token_id in ids:
            stop = detok.update([token_id])
            sent += detok.get_next_output_text(finished=stop is not None, delta=True)
            assert detok.output_text.startswith(sent)  # nothing streamed is ever taken back
            if stop is not None:
                break
        sent += detok.get_next_output_text(finished=True, delta=True)
        assert sent == detok.output_text == reference_stop(tok, ids, stops, include), (text, stops, include)
