"""The option tables of docs/sampling.md and docs/engine.md are generated from the same definitions as the manifest."""

from __future__ import annotations

from lmport.engine.config import option_schema
from lmport.engine.sampling_params import sampling_params_schema
from lmport.engine.schema_docs import DOCS, _schema_row, stale_docs


def test_generated_tables_are_current() -> None:
    assert stale_docs() == [], "stale tables: run `python -m lmport.engine.schema_docs`"


def test_open_lower_bounds_are_marked() -> None:
    rows = {e["name"]: _schema_row(e) for e in sampling_params_schema()}
    assert rows["top_p"][3] == "(0.0 .. 1.0]"
    assert rows["repetition_penalty"][3] == "(0.0 .. inf"
    assert rows["min_p"][3] == "0.0 .. 1.0"


def test_every_field_documented_with_its_doc() -> None:
    for doc, schema in (("sampling.md", sampling_params_schema()), ("engine.md", option_schema())):
        rows = {line.split("|")[1].strip(" `"): line for line in (DOCS / doc).read_text(encoding="utf-8").splitlines()
                if line.startswith("| `")}
        for entry in schema:
            assert entry["name"] in rows, (doc, entry["name"])
            assert entry["doc"] in rows[entry["name"]].replace("\\|", "|"), (doc, entry["name"])
