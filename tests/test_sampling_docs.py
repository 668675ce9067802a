"""docs/sampling.md documents every SamplingParams field, generated from the same definitions as the manifest."""

from __future__ import annotations

from pathlib import Path

from engine.sampling_params import render_doc, sampling_params_schema

DOC = Path(__file__).resolve().parent.parent / "docs" / "sampling.md"


def test_field_table_is_current() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert render_doc(text) == text, "stale table: run `python -m engine.sampling_params --markdown docs/sampling.md`"


def test_every_field_documented_with_its_default() -> None:
    rows = {line.split("|")[1].strip(" `"): line for line in DOC.read_text(encoding="utf-8").splitlines()
            if line.startswith("| `")}
    for entry in sampling_params_schema():
        assert entry["name"] in rows, entry["name"]
        assert entry["doc"] in rows[entry["name"]].replace("\\|", "|")
