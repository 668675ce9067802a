"""LLM.embed: the BertModel encoder against sentence-transformers on the same weights (all-MiniLM-L6-v2), decoder
pooling against transformers' hidden states (bundled SmolLM2), embed requests batched with running generations,
and bad input."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from lmport.engine import LLM, SamplingParams
from lmport.engine.errors import InvalidParams

pytestmark = pytest.mark.slow

WORDS = ("the model embeds every sentence into one vector so that similar meanings land close together while "
         "unrelated topics such as cooking rivers mountains trains music chess gardens physics poetry weather "
         "markets stay far apart").split()


def reference_texts(count: int = 100, seed: int = 17) -> list[str]:
    """Deterministic sentences of 1 to 120 words (short and long inputs, mixed lengths in every batch)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 120))).capitalize() + "." for _ in range(count)]


@pytest.fixture(scope="module")
def minilm():
    llm = LLM("all-MiniLM-L6-v2", device="cpu")
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def smollm():
    # a small token budget, so a long input is pooled over several prefill chunks
    llm = LLM("smollm2", dtype="float32", device="cpu", kv_cache_memory_bytes=256 << 20, max_model_len=2048,
              max_num_batched_tokens=48)
    yield llm
    llm.shutdown()


def test_minilm_matches_sentence_transformers_on_100_texts(minilm):
    from sentence_transformers import SentenceTransformer

    texts = reference_texts()
    reference = SentenceTransformer(str(minilm.engine.model_path), device="cpu")
    expected = reference.encode(texts, convert_to_tensor=True, batch_size=32).float()
    ours = torch.tensor([o.embedding for o in minilm.embed(texts, use_tqdm=False)])
    assert ours.shape == expected.shape == (100, 384)
    cosine = F.cosine_similarity(ours, expected)
    assert cosine.min().item() > 0.9999, cosine.min().item()
    assert torch.allclose(ours.norm(dim=1), torch.ones(100), atol=1e-5)


def test_minilm_resolves_every_name_and_refuses_generation(minilm):
    assert minilm.is_encoder and minilm.num_kv_blocks == 0
    assert minilm.max_model_len == 256  # sentence_bert_config.json's max_seq_length, not the 512 positions
    with pytest.raises(InvalidParams) as info:
        minilm.generate("hello", use_tqdm=False)
    assert info.value.field == "model" and "encoder" in str(info.value)


def test_cls_last_and_unnormalized_pooling_follow_the_hidden_states(minilm):
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(minilm.engine.model_path, dtype=torch.float32).eval()
    text = "Pooling picks which hidden states become the embedding."
    ids = minilm.tokenize(text)
    with torch.inference_mode():
        hidden = hf(torch.tensor([ids])).last_hidden_state[0]
    for pooling, expected in (("cls", hidden[0]), ("last", hidden[-1]), ("mean", hidden.mean(0))):
        [out] = minilm.embed([text], pooling=pooling, normalize=False, use_tqdm=False)
        assert out.prompt_token_ids == ids
        torch.testing.assert_close(torch.tensor(out.embedding), expected, atol=2e-5, rtol=1e-4)


def test_dimensions_truncate_then_normalize(minilm):
    [full] = minilm.embed(["matryoshka"], normalize=False, use_tqdm=False)
    [short] = minilm.embed(["matryoshka"], dimensions=64, use_tqdm=False)
    assert len(short.embedding) == 64
    torch.testing.assert_close(torch.tensor(short.embedding), F.normalize(torch.tensor(full.embedding[:64]), dim=0))


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
def test_decoder_pooling_matches_transformers_across_prefill_chunks(smollm, pooling):
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(smollm.engine.model_path, dtype=torch.float32).eval()
    texts = ["Short.", " ".join(WORDS * 4)]  # the second spans several chunks
    outputs = smollm.embed(texts, pooling=pooling, normalize=False, use_tqdm=False)
    assert len(outputs[1].prompt_token_ids) > 2 * 48
    for out in outputs:
        with torch.inference_mode():
            hidden = hf(torch.tensor([out.prompt_token_ids])).last_hidden_state[0]
        expected = {"mean": hidden.mean(0), "last": hidden[-1], "cls": hidden[0]}[pooling]
        assert F.cosine_similarity(torch.tensor(out.embedding), expected, dim=0).item() > 0.99999


def test_embed_requests_batch_with_running_generations(smollm):
    greedy = SamplingParams(temperature=0.0, max_tokens=24, min_tokens=24)
    alone = smollm.generate(["The capital of France is"], greedy, use_tqdm=False)[0].outputs[0].token_ids
    [embedded_alone] = smollm.embed(["embedded while decoding"], use_tqdm=False)
    steps_before = smollm.stats()["steps"]
    stream = smollm.add_request("The capital of France is", greedy)
    embedded = smollm.embed(["embedded while decoding"] * 4, use_tqdm=False)
    generated = stream.result().outputs[0].token_ids
    stats = smollm.stats()
    assert generated == alone  # the generation is undisturbed
    for out in embedded:
        torch.testing.assert_close(torch.tensor(out.embedding), torch.tensor(embedded_alone.embedding))
    # they shared steps: one generation alone takes 24 steps, the embeddings added no steps of their own past it
    assert stats["steps"] - steps_before <= 24 + 1
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


@pytest.mark.parametrize("engine", ["minilm", "smollm"])
def test_bad_input_names_the_field_and_leaks_nothing(engine, request):
    llm = request.getfixturevalue(engine)
    cases = [
        (dict(texts=[]), "input"),
        (dict(texts=["word " * (llm.max_model_len + 5)]), "input"),
        (dict(texts=[[]]), "input"),
        (dict(texts=[[llm.engine.vocab_size]]), "input"),
        (dict(texts=["x"], pooling="max"), "pooling"),
        (dict(texts=["x"], dimensions=0), "dimensions"),
        (dict(texts=["x"], dimensions=llm.engine.hf_config.hidden_size + 1), "dimensions"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InvalidParams) as info:
            llm.embed(**kwargs, use_tqdm=False)
        assert info.value.field == field, (kwargs, info.value)
    stats = llm.stats()
    assert stats["num_waiting"] == 0 and stats["num_running"] == 0
    if not llm.is_encoder:
        assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_abort_answers_an_embed_request_with_no_embedding(smollm):
    from lmport.engine.pooling import PoolingParams

    long_input = [7] * 300  # 7 prefill steps at 48 tokens a step: the abort lands before it is done
    [stream] = smollm.add_embed_requests([long_input], PoolingParams())
    assert stream.abort()
    out = stream.result()
    assert out.embedding is None and out.finished
    stats = smollm.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
