"""POST /v1/embeddings and /v1/rerank on a real server socket: the official `openai` SDK's embeddings.create (float
and base64) against all-MiniLM-L6-v2, compared with sentence-transformers; the decoder served by the same app;
rerank ordering; and every bad input as a 400 naming its field."""

from __future__ import annotations

import base64
import struct

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F

from lmport.bridge.http.backend import ServiceBackend
from lmport.bridge.http.config import load_settings
from lmport.bridge.http.server import RunningServer
from tests.http_helpers import model_server, shared_service

pytestmark = pytest.mark.slow

TEXTS = ["A man is eating food.", "A man is riding a horse.", "Someone is having a meal."]


@pytest.fixture(scope="module")
def server():
    settings = load_settings({"port": 0, "uvicorn_log_level": "warning", "model": "all-MiniLM-L6-v2",
                              "device": "cpu"}, environ={})
    running = RunningServer(settings, ServiceBackend(settings.engine, service=shared_service())).wait_ready()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def sentence_transformer(server):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(server.state.backend.handle["model_path"], device="cpu")


@pytest.fixture(scope="module")
def reference(sentence_transformer):
    return sentence_transformer.encode(TEXTS, convert_to_tensor=True).float()


def test_openai_sdk_embeddings_match_sentence_transformers(client, reference) -> None:
    # Without encoding_format the SDK asks for base64 and decodes it itself; asked for explicitly, base64 comes back
    # as the string (little-endian float32 bytes) and float as the JSON list.
    default = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS)
    as_float = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS, encoding_format="float")
    as_base64 = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS, encoding_format="base64")
    decoded = [list(struct.unpack(f"<{len(d.embedding) * 3 // 4 // 4}f", base64.b64decode(d.embedding)))
               for d in as_base64.data]
    for reply, vectors in ((default, [d.embedding for d in default.data]),
                           (as_float, [d.embedding for d in as_float.data]), (as_base64, decoded)):
        assert reply.object == "list" and reply.model == "all-MiniLM-L6-v2"
        assert [d.index for d in reply.data] == [0, 1, 2] and all(d.object == "embedding" for d in reply.data)
        ours = torch.tensor(vectors)
        assert ours.shape == (3, 384)
        assert F.cosine_similarity(ours, reference).min().item() > 0.9999
        assert reply.usage.prompt_tokens == reply.usage.total_tokens > len(TEXTS)
    assert decoded[0] == pytest.approx(as_float.data[0].embedding, abs=1e-7)


def test_dimensions_shorten_and_renormalize(client) -> None:
    reply = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[:2], dimensions=32)
    vectors = torch.tensor([d.embedding for d in reply.data])
    assert vectors.shape == (2, 32)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(2))


def test_token_id_input_equals_the_text(server, client) -> None:
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": TEXTS[0]}).json()["tokens"]
    by_ids = client.embeddings.create(model="all-MiniLM-L6-v2", input=[ids], encoding_format="float")
    by_text = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[0], encoding_format="float")
    assert by_ids.data[0].embedding == pytest.approx(by_text.data[0].embedding, abs=1e-6)


def test_rerank_scores_are_the_reference_cosine_similarities(server, sentence_transformer) -> None:
    query = "Someone is having a meal."
    documents = ["The stock market fell today.", "A person eats dinner.", "Horses run in the field."]
    vectors = sentence_transformer.encode([query, *documents], convert_to_tensor=True).float()
    expected = (vectors[1:] @ vectors[0]).tolist()
    order = sorted(range(3), key=lambda i: -expected[i])
    body = {"model": "all-MiniLM-L6-v2", "query": query, "documents": documents, "top_n": 2}
    reply = httpx.post(f"{server.url}/v1/rerank", json=body)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert [r["index"] for r in data["results"]] == order[:2] and order[0] == 1  # the meal, first
    for result in data["results"]:
        assert result["relevance_score"] == pytest.approx(expected[result["index"]], abs=1e-4)
        assert result["document"] == {"text": documents[result["index"]]}
    assert data["usage"]["prompt_tokens"] == data["usage"]["total_tokens"] > 0
    everything = httpx.post(f"{server.url}/v1/rerank", json={**body, "top_n": None, "return_documents": False}).json()
    assert [r["index"] for r in everything["results"]] == order and "document" not in everything["results"][0]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/embeddings", {"input": []}, "input"),
    ("/v1/embeddings", {"input": ["fine", "word " * 300]}, "input[1]"),
    ("/v1/embeddings", {"input": "x", "pooling": "max"}, "pooling"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/embeddings", {"input": "x", "dimensions": 0}, "dimensions"),
    ("/v1/embeddings", {"input": "x", "dimensions": 4096}, "dimensions"),
    ("/v1/embeddings", {"input": "x", "inputs": "typo"}, "inputs"),
    ("/v1/rerank", {"query": "q", "documents": []}, "documents"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": ["a", "word " * 300]}, "documents[1]"),
    ("/v1/rerank", {"query": "word " * 300, "documents": ["a"]}, "query"),
])
def test_bad_input_is_a_400_naming_the_field(server, path, body, param) -> None:
    reply = httpx.post(f"{server.url}{path}", json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert param.split("[")[0] in error["message"]


def test_the_sdk_raises_bad_request_for_an_input_over_max_model_len(client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="all-MiniLM-L6-v2", input="word " * 300)
    assert info.value.body["param"] == "input" and "max_model_len" in info.value.body["message"]


def test_a_decoder_serves_embeddings_too() -> None:
    running = model_server()
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        reply = client.embeddings.create(model="smollm2", input=["one", "two"], extra_body={"pooling": "last"})
        assert len(reply.data) == 2 and len(reply.data[0].embedding) == 576
        assert abs(sum(v * v for v in reply.data[0].embedding) - 1) < 1e-4
    finally:
        running.stop()
