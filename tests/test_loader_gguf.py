"""Local .gguf files: converted once into $LMPORT_CACHE (atomic, race-safe), then loaded like any HF directory."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

import lmport.engine.gguf_convert as gguf_convert
from lmport.engine.config import EngineConfig
from lmport.engine.gguf_convert import cached_dir_for, convert_gguf
from lmport.engine.loader import load_model
from tests.model_harness import PagedHarness, PagedSeq, tiny_llama, write_tiny_gguf


@pytest.fixture
def gguf_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, torch.nn.Module]:
    monkeypatch.setenv("LMPORT_CACHE", str(tmp_path / "cache"))
    hf = tiny_llama()
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, hf)
    return path, hf


def test_gguf_loads_with_parity_to_the_original_weights(gguf_file: tuple[Path, torch.nn.Module],
                                                        tmp_path: Path) -> None:
    path, hf = gguf_file
    loaded = load_model(EngineConfig(model=str(path)))
    cached = Path(loaded.model_path)
    assert cached.parent == tmp_path / "cache" / "models" and cached.name.startswith("tiny-")
    assert {p.name for p in cached.iterdir()} >= {"config.json", "generation_config.json", "model.safetensors",
                                                  "tokenizer.json", "tokenizer_config.json"}
    assert loaded.dtype == torch.float32 and loaded.eos_token_ids == [259]
    assert "<|im_start|>assistant" in loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    tokens = loaded.tokenizer("hello there").input_ids
    got = PagedHarness(loaded.model).step([(PagedSeq(), tokens)])[0]
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)  # q/k un-permuted, weights exact


def test_conversion_is_cached_and_keyed_by_file_identity(gguf_file: tuple[Path, torch.nn.Module],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = gguf_file
    first = convert_gguf(path)
    monkeypatch.setattr(gguf_convert, "_convert_into", lambda *a: pytest.fail("converted twice"))
    assert convert_gguf(path) == first
    os.utime(path, ns=(1, 1))  # a changed file (mtime) gets a fresh conversion
    assert cached_dir_for(path) != first


def test_concurrent_conversions_convert_once(gguf_file: tuple[Path, torch.nn.Module],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = gguf_file
    calls = []
    real = gguf_convert._convert_into
    # slow enough that all three threads are inside convert_gguf at once
    monkeypatch.setattr(gguf_convert, "_convert_into", lambda *a: calls.append(1) or time.sleep(0.5) or real(*a))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(convert_gguf(path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3
    leftovers = [p.name for p in results[0].parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_failed_conversion_leaves_nothing_behind(gguf_file: tuple[Path, torch.nn.Module],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = gguf_file

    def broken(gguf_path: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_convert, "_convert_into", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_gguf(path)
    models = cached_dir_for(path).parent
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []
