"""The Elixir generator: literals, docs and the shape of the generated API."""

from __future__ import annotations

import pytest

from lmport.bridge.codegen.common import load_manifest
from lmport.bridge.codegen.elixir import OUT_DIR, generate, literal


def test_literals() -> None:
    assert literal(None) == "nil"
    assert literal([True, False, 1, -2]) == "[true, false, 1, -2]"
    assert literal(1e-05) == "1.0e-5"
    assert literal(0.9) == "0.9"
    assert literal(2.0**70) == "1.1805916207174113e21"
    assert literal('a "q" #{x} \\ \n é') == '"a \\"q\\" \\#{x} \\\\ \\n é"'
    assert literal({"k": [1]}) == '%{"k" => [1]}'
    with pytest.raises(ValueError, match="non-finite"):
        literal(float("nan"))


def test_generated_api_shape() -> None:
    files = generate(load_manifest())
    assert sorted(files) == [f"{OUT_DIR}/lmport.ex", f"{OUT_DIR}/schema.ex"]
    api = files[f"{OUT_DIR}/lmport.ex"]
    for signature in ("def llm(worker, model, opts \\\\ [])",
                      "def generate(worker, llm, prompts, opts \\\\ [])",
                      "def generate!(worker, llm, prompts, opts \\\\ [])",
                      "def chat(worker, llm, messages, opts \\\\ [])",
                      "def sampling_params(worker, opts \\\\ [])",
                      "def tokenize(worker, llm, text, opts \\\\ [])",
                      "def detokenize(worker, llm, token_ids, opts \\\\ [])",
                      "def stats(worker, opts \\\\ [])", "def health(worker, opts \\\\ [])",
                      "defdelegate run(fun, opts \\\\ []), to: LMPort.Runner"):
        assert signature in api, signature
    assert "def shutdown(" not in api
    schema = files[f"{OUT_DIR}/schema.ex"]
    assert 'def schema_for_param("sampling_params"), do: @schemas["SamplingParams"]' in schema
