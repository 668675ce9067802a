"""The committed generated client code is current: regenerate in-process from the manifest and diff."""

from __future__ import annotations

import importlib.util

import pytest

from lmport.bridge.codegen.cli import generate
from lmport.bridge.codegen.common import LANGUAGES, REPO_ROOT, load_manifest, stale_files


@pytest.fixture(scope="module")
def manifest() -> dict:
    return load_manifest()


@pytest.mark.parametrize("lang", sorted(LANGUAGES))
def test_generated_code_is_current(lang: str, manifest: dict) -> None:
    assert importlib.util.find_spec(LANGUAGES[lang].module) is not None, f"no generator for {lang}"
    files = generate(lang, manifest)
    assert files, f"the {lang} generator produced nothing"
    problems = stale_files(REPO_ROOT / LANGUAGES[lang].client_dir, files)
    assert not problems, (f"generated {lang} code is stale — run `lmport codegen --lang {lang}` and commit:\n"
                          + "\n".join(problems))


@pytest.mark.parametrize("lang", sorted(LANGUAGES))
def test_generation_is_deterministic(lang: str, manifest: dict) -> None:
    assert generate(lang, manifest) == generate(lang, load_manifest())
