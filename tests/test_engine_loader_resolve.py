"""resolve_model's errors for local paths: a revision has no meaning there, and a file must be a .gguf."""

from __future__ import annotations

from pathlib import Path

import pytest

import lmport.engine.loader as loader
from lmport.engine.errors import InvalidParams
from lmport.engine.loader import resolve_model
from tests.model_harness import write_tiny_model_dir


def test_revision_with_a_local_directory_is_rejected(tmp_path: Path) -> None:
    write_tiny_model_dir(tmp_path / "m")
    assert resolve_model(str(tmp_path / "m")) == tmp_path / "m"
    with pytest.raises(InvalidParams) as err:
        resolve_model(str(tmp_path / "m"), revision="v2")
    assert err.value.field == "revision"
    assert "only applies to hub ids" in err.value.message and "local directory" in err.value.message


def test_revision_with_a_local_gguf_file_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(loader, "convert_gguf", lambda path: Path("/converted"))
    assert resolve_model(str(gguf)) == Path("/converted")
    with pytest.raises(InvalidParams) as err:
        resolve_model(str(gguf), revision="main")
    assert err.value.field == "revision"
    assert "only applies to hub ids" in err.value.message and ".gguf" in err.value.message


@pytest.mark.parametrize("field", ["model", "tokenizer"])
def test_existing_file_that_is_not_gguf_says_so(tmp_path: Path, field: str) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    options = {} if field == "model" else {"field": field}  # "model" is the default
    with pytest.raises(InvalidParams) as err:
        resolve_model(str(weights), **options)
    assert err.value.field == field
    assert "not a .gguf file" in err.value.message and "no such path" not in err.value.message
