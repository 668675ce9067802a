"""Shared generator helpers: manifest loading, type vocabulary, naming, staleness detection, the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from lmport.bridge.codegen import cli
from lmport.bridge.codegen.common import (
    api_methods,
    camel_case,
    check_manifest,
    constraint_text,
    header,
    is_generated,
    load_manifest,
    option_params,
    pascal_case,
    positional_params,
    schema_for_param,
    snake_case,
    stale_files,
    type_alternatives,
    write_files,
)


def test_type_alternatives_maps_unknown_types_to_any() -> None:
    assert type_alternatives("str|list[str]") == ["str", "list[str]"]
    assert type_alternatives("int | null") == ["int", "null"]
    assert type_alternatives("list[list[int]]|tuple") == ["any"]
    assert type_alternatives(None) == ["any"]


def test_naming() -> None:
    assert snake_case("SamplingParams") == "sampling_params"
    assert pascal_case("sampling_params") == "SamplingParams"
    assert camel_case("max_tokens") == "maxTokens"


def test_constraint_text() -> None:
    assert constraint_text({"min": 0, "max": 1}) == "0 .. 1"
    assert constraint_text({"min": 1}) == ">= 1"
    assert constraint_text({"min": 0.0, "max": 1.0, "exclusive_min": True}) == "(0.0 .. 1.0]"
    assert constraint_text({"min": 0.0, "exclusive_min": True}) == "> 0.0"
    assert constraint_text({"choices": ["a", "b"]}) == 'one of "a", "b"'
    assert constraint_text({}) == ""


def test_in_process_manifest_has_what_generators_need() -> None:
    manifest = load_manifest()
    names = {m["name"] for m in api_methods(manifest)}
    assert {"llm", "sampling_params", "generate", "chat", "tokenize", "detokenize", "release", "stats",
            "health"} <= names
    assert "shutdown" not in names  # lifecycle belongs to each transport
    generate = next(m for m in manifest["methods"] if m["name"] == "generate")
    assert [p["name"] for p in positional_params(generate)][:2] == ["llm", "prompts"]
    sampling = next(p for p in option_params(generate) if p["name"] == "sampling_params")
    assert schema_for_param(manifest, sampling) == "SamplingParams"
    llm = next(m for m in manifest["methods"] if m["name"] == "llm")
    assert [p["name"] for p in positional_params(llm)] == ["model"]


def test_check_manifest_names_the_missing_key() -> None:
    with pytest.raises(ValueError, match="timeout_profiles"):
        check_manifest({"protocol": 1, "methods": [], "schemas": {}, "error_codes": []})


def test_stale_files_detects_missing_changed_and_orphaned(tmp_path: Path) -> None:
    text = header("elixir", "#") + "defmodule A do\nend\n"
    files = {"lib/gen/a.ex": text}
    assert stale_files(tmp_path, files) == [f"missing: {tmp_path / 'lib/gen/a.ex'}"]
    write_files(tmp_path, files)
    assert stale_files(tmp_path, files) == []
    (tmp_path / "lib/gen/a.ex").write_text(text + "# edited\n")
    assert stale_files(tmp_path, files) == [f"stale: {tmp_path / 'lib/gen/a.ex'}"]
    write_files(tmp_path, files)
    orphan = tmp_path / "lib/gen/old.ex"
    orphan.write_text(header("elixir", "#"))
    (tmp_path / "lib/gen/hand_written.ex").write_text("defmodule B do\nend\n")
    assert stale_files(tmp_path, files) == [f"no longer generated: {orphan}"]
    write_files(tmp_path, files)
    assert not orphan.exists() and (tmp_path / "lib/gen/hand_written.ex").exists()
    assert is_generated(text) and not is_generated("defmodule B do\nend\n")


def test_cli_writes_then_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest_file = tmp_path / "manifest.json"
    manifest_file.write_text(json.dumps(load_manifest()))
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "client"
    check = parser.parse_args(["--lang", "elixir", "--out", str(out), "--manifest", str(manifest_file), "--check"])
    assert cli.run(check) == 1
    assert "generated elixir code is stale" in capsys.readouterr().err
    assert cli.run(parser.parse_args(["--lang", "elixir", "--out", str(out), "--manifest", str(manifest_file)])) == 0
    assert cli.run(check) == 0
