"""The manifest is derived from the Python definitions, complete, and safe for every client language."""

from __future__ import annotations

import inspect

import msgpack

from lmport.bridge import manifest, protocol, results, service
from lmport.bridge.protocol import Handle
from lmport.engine.config import option_schema
from lmport.engine.sampling_params import sampling_params_schema
from tests.bridge_helpers import conforms

VOCABULARY = {"str", "int", "float", "bool", "any", "dict", "handle", "list", "list[int]", "list[str]", "list[dict]",
              "list[float]", "null"}


def test_methods_come_from_the_service_signatures():
    built = manifest.build_manifest()
    by_name = {m["name"]: m for m in built["methods"]}
    assert list(by_name) == list(service.METHODS)
    for name, spec in service.METHODS.items():
        entry = by_name[name]
        assert entry["doc"] and entry["returns"]["doc"], name
        assert entry["streaming"] == spec.streaming and entry["timeout_profile"] == spec.timeout_profile
        if spec.options is None:
            names = [p for p in inspect.signature(spec.func).parameters if p not in ("self", "call")]
            assert [p["name"] for p in entry["params"]] == names
            assert all(p["doc"] for p in entry["params"]), name
    assert by_name["generate"]["params"][0] == {"name": "llm", "type": "handle", "required": True,
                                                "doc": "the LLM handle (map or ref string)."}
    assert by_name["generate"]["timeout_profile"] == "ml_inference" and by_name["ping"]["timeout_profile"] == "default"


def test_option_schemas_are_the_engine_definitions():
    built = manifest.build_manifest()
    assert built["schemas"]["EngineOptions"] == option_schema()
    sampling = sampling_params_schema()
    assert [f["name"] for f in built["schemas"]["SamplingParams"]] == [f["name"] for f in sampling]
    assert {m["name"]: m["params"] for m in built["methods"]}["llm"] == built["schemas"]["EngineOptions"]
    fields = {f["name"]: f for f in built["schemas"]["SamplingParams"]}
    # an open lower bound travels as exclusive_min (the worker rejects top_p=0); a closed one carries no flag
    assert fields["top_p"]["exclusive_min"] is True and fields["repetition_penalty"]["exclusive_min"] is True
    assert "exclusive_min" not in fields["min_p"]
    assert [e["code"] for e in built["error_codes"]] == list(protocol.ERROR_CODES)
    assert built["timeout_profiles"] == protocol.TIMEOUT_PROFILES


def _walk(value):
    yield value
    if isinstance(value, dict):
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v)


def test_manifest_is_wire_safe_and_uses_the_type_vocabulary():
    built = manifest.build_manifest()
    assert msgpack.unpackb(msgpack.packb(built), raw=False) == built
    assert all(abs(v) <= protocol.MAX_SAFE_INT for v in _walk(built) if isinstance(v, int))
    fields = [p for m in built["methods"] for p in m["params"]] + \
        [f for s in built["schemas"].values() for f in s]
    for field in fields:
        assert set(field["type"].split("|")) <= VOCABULARY, field


def test_a_new_method_appears_from_its_definition_alone(monkeypatch):
    monkeypatch.setattr(service, "METHODS", dict(service.METHODS))

    @service.rpc("batch_job")
    def score(self, llm: Handle, inputs: list[str], normalize: bool = True) -> list[dict]:
        """Pool embeddings for texts.

        Args:
            llm: the LLM handle.
            inputs: the texts,
                one per vector.
            normalize: scale each vector to unit length.
        Returns:
            One vector per input.
        """

    entry = next(m for m in manifest.build_manifest()["methods"] if m["name"] == "score")
    assert entry == {"name": "score", "doc": "Pool embeddings for texts.", "streaming": False,
                     "timeout_profile": "batch_job", "returns": {"type": "list[dict]", "doc": "One vector per input."},
                     "params": [{"name": "llm", "type": "handle", "required": True, "doc": "the LLM handle."},
                                {"name": "inputs", "type": "list[str]", "required": True,
                                 "doc": "the texts, one per vector."},
                                {"name": "normalize", "type": "bool", "required": False, "default": True,
                                 "doc": "scale each vector to unit length."}]}


def test_result_shapes_are_declared_once_and_reference_only_known_records():
    built = manifest.build_manifest()
    records = built["results"]
    assert records == results.results_schema() and "RequestOutput" in records

    def names(expr: str) -> set[str]:
        found = set()
        for alternative in results.split_union(expr):
            found |= names(alternative[5:-1]) if alternative.startswith("list[") else {alternative}
        return found

    known = set(records) | {"str", "int", "float", "bool", "null"}
    for record, fields in records.items():
        for f in fields:
            assert names(f["type"]) <= known, (record, f)
            assert f["doc"], (record, f["name"])
    by_name = {m["name"]: m for m in built["methods"]}
    for method in ("generate", "chat"):
        returns = by_name[method]["returns"]
        assert (returns["result"], returns["chunk"], returns["summary"]) == ("list[RequestOutput]", "Chunk", "Summary")


def test_conforms_names_the_first_difference():
    shapes = results.results_schema()
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert conforms(usage, "Usage", shapes) is None
    assert "unexpected keys ['extra']" in conforms({**usage, "extra": 1}, "Usage", shapes)
    assert "missing keys ['total_tokens']" in conforms({"prompt_tokens": 1, "completion_tokens": 2},
                                                              "Usage", shapes)
    assert conforms({**usage, "total_tokens": "3"}, "Usage", shapes) == \
        "result.total_tokens: expected int, got str '3'"
    assert conforms([[None]], "list[list[LogprobEntry]|null]", shapes) is not None
    assert conforms([None, []], "list[list[LogprobEntry]|null]", shapes) is None
