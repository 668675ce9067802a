"""load_model on tiny local HF directories: weights, dtype and device rules, max_model_len, tokenizer, eos ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig

from lmport.engine.config import EngineConfig
from lmport.engine.errors import InvalidParams, ModelNotFound, UnsupportedModel
from lmport.engine.loader import load_model, resolve_device, resolve_dtype
from tests.model_harness import PagedHarness, PagedSeq, write_tiny_model_dir

PROMPT = [5, 17, 104, 256, 33, 2, 90]


def paged_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    return PagedHarness(model).step([(PagedSeq(), tokens)])[0]


def hf_logits(hf: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0]


@pytest.fixture
def tiny_dir(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    path = tmp_path / "tiny"
    hf = write_tiny_model_dir(path)
    GenerationConfig(eos_token_id=[259, 257], bos_token_id=258).save_pretrained(path)
    return path, hf


def test_local_directory_loads_with_hf_parity(tiny_dir: tuple[Path, torch.nn.Module]) -> None:
    path, hf = tiny_dir
    loaded = load_model(EngineConfig(model=str(path)))
    assert loaded.model_path == str(path)
    assert (loaded.dtype, loaded.device, loaded.max_model_len, loaded.vocab_size) == \
        (torch.float32, torch.device("cpu"), 128, 260)
    assert loaded.eos_token_ids == [259, 257]  # generation_config's order; the tokenizer's eos (259) not repeated
    assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) \
        == "<|im_start|>user\nhi<|im_end|>\n"
    torch.testing.assert_close(paged_logits(loaded.model, PROMPT), hf_logits(hf, PROMPT), atol=1e-4, rtol=0)


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    hf = write_tiny_model_dir(tmp_path, max_shard_size="60KB")
    shards = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards)) > 1
    loaded = load_model(EngineConfig(model=str(tmp_path)))
    torch.testing.assert_close(paged_logits(loaded.model, PROMPT), hf_logits(hf, PROMPT), atol=1e-4, rtol=0)


def test_explicit_dtype_is_honoured(tiny_dir: tuple[Path, torch.nn.Module]) -> None:
    path, hf = tiny_dir
    loaded = load_model(EngineConfig(model=str(path), dtype="bfloat16"))
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    got = paged_logits(loaded.model, PROMPT)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, hf_logits(hf, PROMPT), atol=0.25, rtol=0.05)


def test_max_model_len_is_capped_by_the_model(tiny_dir: tuple[Path, torch.nn.Module]) -> None:
    path, _ = tiny_dir
    assert load_model(EngineConfig(model=str(path), max_model_len=64)).max_model_len == 64
    with pytest.raises(InvalidParams, match="129 exceeds the model's limit of 128") as err:
        load_model(EngineConfig(model=str(path), max_model_len=129))
    assert err.value.field == "max_model_len"


def test_separate_tokenizer_directory(tiny_dir: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path, _ = tiny_dir
    other = tmp_path / "tok"
    write_tiny_model_dir(other)
    (other / "chat_template.jinja").write_text("custom")
    loaded = load_model(EngineConfig(model=str(path), tokenizer=str(other)))
    assert loaded.tokenizer.chat_template == "custom"


def test_unsupported_architecture_fails_before_weights(tiny_dir: tuple[Path, torch.nn.Module]) -> None:
    path, _ = tiny_dir
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="FalconForCausalLM.*supported architectures: LlamaForCausalLM"):
        load_model(EngineConfig(model=str(path)))


def test_unknown_model_type_is_unsupported(tiny_dir: tuple[Path, torch.nn.Module]) -> None:
    path, _ = tiny_dir
    (path / "config.json").write_text(json.dumps({"model_type": "no_such_model", "architectures": ["X"]}))
    with pytest.raises(UnsupportedModel, match="cannot read .*config.json"):
        load_model(EngineConfig(model=str(path)))


def test_directory_without_safetensors(tiny_dir: tuple[Path, torch.nn.Module]) -> None:
    path, _ = tiny_dir
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ModelNotFound, match="no \\*.safetensors weights"):
        load_model(EngineConfig(model=str(path)))


@pytest.mark.parametrize(("declared", "device", "expected"), [
    (torch.float32, "cpu", torch.float32), (torch.bfloat16, "cpu", torch.bfloat16),
    (torch.float16, "cpu", torch.bfloat16), (None, "cpu", torch.float32),
    (torch.float32, "cuda", torch.bfloat16), (torch.float16, "cuda", torch.float16),
])
def test_auto_dtype_rule(declared, device: str, expected: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    config = LlamaConfig(dtype=declared)
    assert resolve_dtype("auto", config, torch.device(device)) == expected
    assert resolve_dtype("float16", config, torch.device(device)) == torch.float16


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidParams, match="CUDA is not available") as err:
            resolve_device("cuda:0")
        assert err.value.field == "device"
