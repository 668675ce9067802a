"""The option tables of docs/sampling.md and docs/engine.md are generated from the same definitions as the manifest."""

from __future__ import annotations

from engine.config import option_schema
from engine.sampling_params import sampling_params_schema
from engine.schema_docs import DOCS, stale_docs


def test_generated_tables_are_current() -> None:
    assert stale_docs() == [], "stale tables: run `python -m engine.schema_docs`"


def test_every_field_documented_with_its_doc() -> None:
    for doc, schema in (("sampling.md", sampling_params_schema()), ("engine.md", option_schema())):
        rows = {line.split("|")[1].strip(" `"): line for line in (DOCS / doc).read_text(encoding="utf-8").splitlines()
                if line.startswith("| `")}
        for entry in schema:
            assert entry["name"] in rows, (doc, entry["name"])
            assert entry["doc"] in rows[entry["name"]].replace("\\|", "|"), (doc, entry["name"])
