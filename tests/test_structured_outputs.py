"""Structured outputs (xgrammar): parameter validation, the bitmask in the sampler, and generation on the bundled
SmolLM2 constrained to JSON schemas, JSON objects, regexes, choices and EBNF, with n > 1, seeds, logprobs, stop
strings, streaming, prefix caching, preemption, and through the worker over real pipes."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from lmport.engine import LLM, SamplingParams
from lmport.engine.config import EngineConfig
from lmport.engine.errors import InvalidParams
from lmport.engine.loader import resolve_model
from lmport.engine.sampler import Sampler, SamplingBatch
from lmport.engine.sampling_params import sampling_params_schema
from lmport.engine.structured_outputs import MAX_WHITESPACE_RUN, GrammarCompiler, StructuredOutputsParams

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "pets": {"type": "array", "items": {"enum": ["cat", "dog"]},
                                                    "maxItems": 3}},
          "required": ["name", "age", "pets"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


# --- parameters (no model) ---

@pytest.mark.parametrize(("value", "field", "words"), [
    ({"json": PERSON, "regex": "a"}, "structured_outputs", "exactly one"),
    ({}, "structured_outputs", "got none"),
    ("json", "structured_outputs", "expected a map"),
    ({"jsonschema": {}}, "structured_outputs.jsonschema", "unknown key"),
    ({"json": {"type": "object", "properties": {"a": {"type": "frob"}}}}, "structured_outputs.json",
     "invalid JSON schema at properties/a/type"),
    ({"json": "{not json"}, "structured_outputs.json", "not valid JSON"),
    ({"json": [1]}, "structured_outputs.json", "is an object"),
    ({"regex": ""}, "structured_outputs.regex", "non-empty string"),
    ({"choice": []}, "structured_outputs.choice", "non-empty list"),
    ({"choice": ["a", 3]}, "structured_outputs.choice", "non-empty list"),
    ({"json_object": "yes"}, "structured_outputs.json_object", "expected true"),
    ({"grammar": 'root ::= "a"', "disable_any_whitespace": 1}, "structured_outputs.disable_any_whitespace",
     "expected a bool"),
])
def test_bad_structured_outputs_name_the_field(value, field, words):
    with pytest.raises(InvalidParams) as err:
        SamplingParams(structured_outputs=value)
    assert err.value.field == field and words in err.value.message


def test_schema_text_and_map_are_the_same_constraint_and_round_trip():
    from_map = SamplingParams(structured_outputs={"json": PERSON})
    from_text = SamplingParams(structured_outputs={"json": json.dumps(PERSON)})
    assert from_map.structured_outputs == from_text.structured_outputs
    assert from_map.to_dict()["structured_outputs"] == {"json": PERSON, "disable_any_whitespace": False}
    assert SamplingParams.from_dict(from_map.to_dict()) == from_map


def test_guided_decoding_is_an_alias_and_not_both():
    params = SamplingParams.from_dict({"guided_decoding": {"choice": ["a", "b"]}})
    assert params.structured_outputs == StructuredOutputsParams(choice=("a", "b"))
    with pytest.raises(InvalidParams) as err:
        SamplingParams.from_dict({"guided_decoding": {"regex": "a"}, "structured_outputs": {"regex": "b"}})
    assert err.value.field == "guided_decoding"


def test_the_manifest_types_structured_outputs_as_plain_data():
    entry = next(e for e in sampling_params_schema() if e["name"] == "structured_outputs")
    assert entry["type"] == "dict|null" and entry["default"] is None and "xgrammar" in entry["doc"]


def test_backend_option_takes_xgrammar_its_alias_and_refuses_others_by_name():
    assert EngineConfig.from_dict({"guided_decoding_backend": "xgrammar"}).structured_outputs_backend == "xgrammar"
    with pytest.raises(InvalidParams) as err:
        EngineConfig.from_dict({"structured_outputs_backend": "outlines"})
    assert err.value.field == "structured_outputs_backend" and "outlines" in err.value.message
    with pytest.raises(InvalidParams) as err:
        EngineConfig.from_dict({"guided_decoding_backend": "xgrammar", "structured_outputs_backend": "auto"})
    assert err.value.field == "guided_decoding_backend"


# --- compiler and sampler, on the bundled tokenizer (no model weights) ---

@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2"))


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


def test_choices_with_quotes_backslashes_and_newlines_match_exactly(grammars):
    choices = ('say "hi"', "back\\slash", "two\nlines", "naïve")
    spec = StructuredOutputsParams(choice=choices)
    for choice in choices:
        matcher = grammars.matcher(spec)
        assert matcher.accept_string(choice) and matcher.is_completed()
    matcher = grammars.matcher(spec)
    assert not matcher.accept_string("say hi")


def test_json_whitespace_runs_are_bounded(grammars):
    """Unbounded, a sampled run of newlines can eat the whole budget (seen at temperature 1.0 on SmolLM2)."""
    for kind, value in (("json", {"type": "array", "items": {"type": "integer"}}), ("json_object", True)):
        spec = StructuredOutputsParams(**{kind: value})
        opener = "[" if kind == "json" else "{"
        assert grammars.matcher(spec).accept_string(opener + "\n" + " " * (MAX_WHITESPACE_RUN - 1))
        assert not grammars.matcher(spec).accept_string(opener + "\n" + " " * MAX_WHITESPACE_RUN)


@pytest.mark.parametrize(("spec", "field"), [
    ({"regex": "[a-"}, "structured_outputs.regex"),
    ({"grammar": "root ::= undefined_rule"}, "structured_outputs.grammar"),
])
def test_an_uncompilable_constraint_carries_xgrammars_message(grammars, spec, field):
    with pytest.raises(InvalidParams) as err:
        grammars.compile(StructuredOutputsParams.from_value(spec))
    assert err.value.field == field and "xgrammar cannot compile it" in err.value.message
    assert not err.value.message.split(": ", 1)[1].startswith("[")  # xgrammar's log prefix is stripped


def test_the_sampler_masks_only_constrained_rows(tokenizer, grammars):
    vocab = len(tokenizer)
    sampler = Sampler(vocab, [tokenizer.eos_token_id], torch.Generator().manual_seed(0))
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(1))
    free = logits[0].clone()
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, structured_outputs={"choice": ["yes",
                                                                                                              "no"]}),
              SamplingParams(temperature=1.0, seed=3, structured_outputs={"regex": "[0-9]"})]
    batch = SamplingBatch.build(params, [[1, 2]] * 3, [[]] * 3)
    spec_rows = [None, grammars.matcher(params[1].structured_outputs), grammars.matcher(params[2].structured_outputs)]
    batch.matchers = spec_rows
    work = logits.clone()
    out = sampler(work, batch)
    assert out.token_ids[0] == int(free.argmax())  # the unconstrained row is untouched
    assert tokenizer.decode([out.token_ids[1]]) in ("yes", "no", "y", "n", "ye")
    assert re.fullmatch("[0-9]", tokenizer.decode([out.token_ids[2]]))


# --- generation on the bundled model ---

@pytest.fixture(scope="module")
def llm():
    engine = LLM("smollm2", kv_cache_memory_bytes=256 << 20, max_model_len=1024)
    yield engine
    engine.shutdown()


def completions(outputs):
    return [c for o in outputs for c in o.outputs]


@pytest.mark.slow
def test_json_schema_with_n_2_and_seeds_always_validates(llm):
    params = SamplingParams(temperature=1.0, n=2, seed=7, max_tokens=120, structured_outputs={"json": PERSON})
    outputs = llm.chat([ASK] * 3, params, use_tqdm=False)
    results = completions(outputs)
    assert len(results) == 6
    for c in results:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), PERSON)
    assert results[0].token_ids != results[1].token_ids  # the two completions draw with seeds 7 and 8
    again = completions(llm.chat([ASK], params, use_tqdm=False))
    assert [c.token_ids for c in again] == [c.token_ids for c in results[:2]]  # same seed, same tokens


@pytest.mark.slow
def test_regex_choice_grammar_and_json_object(llm):
    regex = llm.generate("My phone number is", SamplingParams(temperature=0.8, seed=1, max_tokens=20,
                                                              structured_outputs={"regex": r"\d{3}-\d{4}"}),
                         use_tqdm=False)[0].outputs[0]
    assert re.fullmatch(r"\d{3}-\d{4}", regex.text) and regex.finish_reason == "stop"
    choice = llm.chat([[{"role": "user", "content": "Is the sky blue? Answer yes or no."}]],
                      SamplingParams(temperature=0.0, max_tokens=10, structured_outputs={"choice": ["yes", "no"]}),
                      use_tqdm=False)[0].outputs[0]
    assert choice.text in ("yes", "no") and choice.finish_reason == "stop"
    grammar = 'root ::= "(" digit ("," digit)* ")"\ndigit ::= [0-9]'
    ebnf = llm.generate("A tuple:", SamplingParams(temperature=1.0, seed=2, max_tokens=30,
                                                   structured_outputs={"grammar": grammar}), use_tqdm=False)[0]
    assert re.fullmatch(r"\(\d(,\d)*\)", ebnf.outputs[0].text) or ebnf.outputs[0].finish_reason == "length"
    anything = llm.chat([ASK], SamplingParams(temperature=0.0, max_tokens=200, structured_outputs={
        "json_object": True, "disable_any_whitespace": True}), use_tqdm=False)[0].outputs[0]
    assert anything.text.startswith("{")
    assert anything.finish_reason == "length" or isinstance(json.loads(anything.text), dict)


@pytest.mark.slow
def test_compact_json_without_free_whitespace(llm):
    c = llm.chat([ASK], SamplingParams(temperature=0.0, max_tokens=120, structured_outputs={
        "json": PERSON, "disable_any_whitespace": True}), use_tqdm=False)[0].outputs[0]
    assert "\n" not in c.text and json.loads(c.text)["age"] >= 0


@pytest.mark.slow
def test_cut_short_is_length_never_stop(llm):
    short = llm.chat([ASK], SamplingParams(temperature=0.0, max_tokens=4, structured_outputs={"json": PERSON}),
                     use_tqdm=False)[0].outputs[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 4
    stopped = llm.chat([ASK], SamplingParams(temperature=0.0, max_tokens=120, stop=['"age"'],
                                             structured_outputs={"json": PERSON}), use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "length" and stopped.stop_reason is None and '"age"' not in stopped.text


@pytest.mark.slow
def test_the_grammar_ends_the_output_even_with_ignore_eos(llm):
    c = llm.generate("Answer:", SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True,
                                               structured_outputs={"choice": ["alpha", "beta"]}),
                     use_tqdm=False)[0].outputs[0]
    assert c.finish_reason == "stop" and c.text.removesuffix("<|im_end|>") in ("alpha", "beta")


@pytest.mark.slow
def test_logprobs_see_the_constrained_distribution(llm):
    c = llm.generate("Pick:", SamplingParams(temperature=1.0, seed=5, max_tokens=5, logprobs=3,
                                             structured_outputs={"choice": ["red", "green"]}),
                     use_tqdm=False)[0].outputs[0]
    assert c.text in ("red", "green")
    for token, position in zip(c.token_ids, c.logprobs):
        assert position[token].logprob > float("-inf")
        assert all(lp.logprob == float("-inf") or lp.decoded_token.strip() in "redgreen<|im_end|>" or
                   lp.decoded_token == "<|endoftext|>" for lp in position.values())


@pytest.mark.slow
def test_streamed_deltas_join_to_the_valid_document(llm):
    params = SamplingParams(temperature=0.0, max_tokens=120, output_kind="delta", structured_outputs={"json": PERSON})
    prompt = {"prompt_token_ids": llm.apply_chat_template(ASK)}
    deltas = list(llm.add_request(prompt, params))
    text = "".join(d.outputs[0].text for d in deltas if d.outputs)
    jsonschema.validate(json.loads(text), PERSON)
    assert deltas[-1].finished and deltas[-1].outputs[0].finish_reason == "stop"


@pytest.mark.slow
def test_constrained_and_free_rows_in_one_batch_do_not_disturb_each_other(llm):
    free = SamplingParams(temperature=0.0, max_tokens=24)
    alone = llm.chat([ASK], free, use_tqdm=False)[0].outputs[0].token_ids
    llm.chat([ASK], free, use_tqdm=False)  # now the prompt is in the prefix cache
    mixed = llm.chat([ASK, ASK, ASK], [free, SamplingParams(temperature=0.0, max_tokens=60,
                                                            structured_outputs={"json": PERSON}), free],
                     use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone and mixed[2].outputs[0].token_ids == alone
    assert mixed[0].num_cached_tokens > 0
    constrained = mixed[1].outputs[0]
    assert constrained.finish_reason == "length" or jsonschema.validate(json.loads(constrained.text), PERSON) is None


@pytest.mark.slow
def test_preempted_constrained_sequences_resume_their_grammar():
    tiny = LLM("smollm2", num_gpu_blocks_override=20, block_size=16, max_model_len=256, enable_prefix_caching=False)
    try:
        params = SamplingParams(temperature=1.0, seed=11, max_tokens=150, structured_outputs={"json": PERSON})
        outputs = tiny.chat([[{"role": "user", "content": f"Person number {i} as JSON."}] for i in range(8)],
                            params, use_tqdm=False)
        assert tiny.stats()["num_preemptions"] > 0
        for c in completions(outputs):
            if c.finish_reason == "stop":
                jsonschema.validate(json.loads(c.text), PERSON)
            else:
                assert c.finish_reason == "length"
        assert tiny.stats()["kv_blocks_free"] == 20
    finally:
        tiny.shutdown()


@pytest.mark.slow
def test_an_invalid_constraint_is_refused_before_joining_the_batch(llm):
    with pytest.raises(InvalidParams) as err:
        llm.generate(["fine", "also fine"], [SamplingParams(), SamplingParams(structured_outputs={"regex": "(a"})],
                     use_tqdm=False)
    assert err.value.field == "structured_outputs.regex" and err.value.index == 1
    stats = llm.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0


# --- through the worker, over real pipes ---

@pytest.mark.slow
def test_the_worker_carries_structured_outputs_and_names_bad_ones():
    from lmport.bridge.protocol import BridgeError
    from tests.bridge_helpers import spawn_shim

    for client in spawn_shim():
        llm = client.llm("smollm2", kv_cache_memory_bytes=128 << 20, max_model_len=1024)
        result = client.chat(llm, ASK, {"temperature": 0.0, "max_tokens": 120,
                                        "structured_outputs": {"json": PERSON}})[0]
        jsonschema.validate(json.loads(result["outputs"][0]["text"]), PERSON)
        alias = client.generate(llm, "Answer:", {"temperature": 0.0, "max_tokens": 5,
                                                 "guided_decoding": {"choice": ["up", "down"]}})
        assert alias[0]["outputs"][0]["text"] in ("up", "down")
        with pytest.raises(BridgeError) as err:
            client.generate(llm, "x", {"structured_outputs": {"json": {"type": "frob"}}})
        assert err.value.code == "invalid_params"
        assert err.value.details["field"] == "sampling_params.structured_outputs.json"
        with pytest.raises(BridgeError) as err:  # compiled once the tokenizer is known: still the wire field
            client.generate(llm, "x", {"structured_outputs": {"regex": "[a-"}})
        assert err.value.details["field"] == "sampling_params.structured_outputs.regex"
