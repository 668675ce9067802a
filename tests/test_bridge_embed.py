"""The worker's embed method through the Python shim (a real worker over real pipes): all-MiniLM-L6-v2 against
sentence-transformers, the result shape, embeds next to a running generation on SmolLM2, and bad input."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F

from lmport.bridge.protocol import BridgeError
from lmport.bridge.results import results_schema
from tests.bridge_helpers import conforms, spawn_shim

pytestmark = pytest.mark.slow

TEXTS = ["A cat sits on the mat.", "Stocks fell sharply on Monday.", "The kitten rests on the rug."]


@pytest.fixture(scope="module")
def client():
    yield from spawn_shim()


@pytest.fixture(scope="module")
def minilm(client):
    return client.llm("all-MiniLM-L6-v2", device="cpu")


def test_embed_matches_sentence_transformers_and_has_the_declared_shape(client, minilm):
    from sentence_transformers import SentenceTransformer

    result = client.embed(minilm, TEXTS)
    assert conforms(result, "EmbedResult", results_schema()) is None
    assert [d["index"] for d in result["data"]] == [0, 1, 2]
    tokens = sum(d["prompt_tokens"] for d in result["data"])
    assert result["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    reference = SentenceTransformer(minilm["model_path"], device="cpu").encode(TEXTS, convert_to_tensor=True)
    ours = torch.tensor([d["embedding"] for d in result["data"]])
    assert F.cosine_similarity(ours, reference.float()).min().item() > 0.9999
    # the paraphrase is nearer than the unrelated sentence
    assert ours[0] @ ours[2] > ours[0] @ ours[1]


def test_embed_options_and_input_forms(client, minilm):
    ids = client.tokenize(minilm, TEXTS[0])
    by_ids = client.embed(minilm, ids)["data"]  # one token-id list is one input
    by_text = client.embed(minilm, TEXTS[0])["data"]
    assert len(by_ids) == len(by_text) == 1 and by_ids[0]["embedding"] == pytest.approx(by_text[0]["embedding"])
    short = client.embed(minilm, [TEXTS[0], ids], pooling="cls", normalize=False, dimensions=8)["data"]
    assert [len(d["embedding"]) for d in short] == [8, 8]
    assert short[0]["embedding"] == pytest.approx(short[1]["embedding"], abs=1e-5)


@pytest.mark.parametrize("params, field", [
    ({"input": []}, "input"),
    ({"input": ["ok", "word " * 300]}, "input[1]"),
    ({"input": ["ok", 5]}, "input[1]"),
    ({"input": "x", "pooling": "max"}, "pooling"),
    ({"input": "x", "dimensions": 0}, "dimensions"),
    ({"input": "x", "dimensions": 385}, "dimensions"),
    ({"input": "x", "normalize": "yes"}, "normalize"),
])
def test_bad_embed_input_is_invalid_params_naming_the_field(client, minilm, params, field):
    with pytest.raises(BridgeError) as info:
        client.call("embed", {"llm": minilm["ref"], **params})
    assert info.value.code == "invalid_params" and info.value.details["field"] == field, info.value
    stats = client.stats(minilm)
    assert stats["num_waiting"] == 0


def test_embed_on_a_decoder_does_not_wait_for_a_running_generation(client):
    smollm = client.llm("smollm2", dtype="float32", kv_cache_memory_bytes=256 << 20, max_model_len=2048)
    stream = client.generate(smollm, "Tell me a long story.", {"temperature": 0.0, "max_tokens": 400,
                                                                 "ignore_eos": True}, stream=True)
    chunks: list = []
    reader = threading.Thread(target=lambda: chunks.extend(stream))
    reader.start()
    while not chunks:
        time.sleep(0.01)
    result = client.embed(smollm, ["embedded while the story is told"], pooling="last")
    generated_meanwhile = sum(len(c["outputs"][0]["token_ids"]) for c in chunks if c["outputs"])
    reader.join()
    assert len(result["data"][0]["embedding"]) == 576  # SmolLM2-135M's hidden size
    assert generated_meanwhile < 400  # answered while the generation still ran
    assert sum(len(c["outputs"][0]["token_ids"]) for c in chunks if c["outputs"]) == 400
    client.release(smollm)
