"""How `model` strings resolve to local directories: bundled aliases, local paths, the local HF cache only."""

from __future__ import annotations

from pathlib import Path

import pytest

import lmport.engine.loader as loader
from lmport.engine.errors import InvalidParams, ModelNotFound
from lmport.engine.gguf_convert import bundled_gguf
from lmport.engine.loader import resolve_model
from tests.model_harness import write_tiny_model_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake HF cache holding org/tiny at COMMIT (refs/main -> COMMIT), found through HF_HOME."""
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    write_tiny_model_dir(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return tmp_path / "hf"


def test_local_directory_resolves_to_itself(tmp_path: Path) -> None:
    write_tiny_model_dir(tmp_path / "m")
    assert resolve_model(str(tmp_path / "m")) == tmp_path / "m"


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="has no config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("name", ["/nonexistent/model", "./missing-model", "missing.gguf", "a/b/c"])
def test_missing_paths_name_the_path(name: str) -> None:
    with pytest.raises(ModelNotFound, match="no such path"):
        resolve_model(name)


def test_hub_id_found_in_local_hf_cache(hf_home: Path) -> None:
    snapshot = hf_home / "hub" / "models--org--tiny" / "snapshots" / COMMIT
    assert resolve_model("org/tiny") == snapshot
    assert resolve_model("org/tiny", revision=COMMIT) == snapshot


def test_hf_hub_cache_env_wins_over_hf_home(hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("HF_HOME", "/nonexistent")
    assert resolve_model("org/tiny").name == COMMIT


def test_missing_revision_fails_fast(hf_home: Path) -> None:
    with pytest.raises(ModelNotFound, match="revision v2"):
        resolve_model("org/tiny", revision="v2")


def test_offline_missing_hub_id_says_where_it_looked_and_how_to_provide_it(
        hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound) as err:
        resolve_model("org/absent")
    message = str(err.value)
    assert str(hf_home / "hub" / "models--org--absent") in message
    assert "hf download org/absent" in message and "HF_HUB_OFFLINE is set" in message


@pytest.mark.parametrize("alias", ["smollm2", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_bundled_aliases_convert_the_packaged_gguf(alias: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(loader, "convert_gguf", lambda path: calls.append(path) or Path("/converted"))
    assert resolve_model(alias) == Path("/converted")
    assert calls == [bundled_gguf()]


def test_bundled_model_rejects_a_revision() -> None:
    with pytest.raises(InvalidParams) as err:
        resolve_model("smollm2", revision="main")
    assert err.value.field == "revision"
