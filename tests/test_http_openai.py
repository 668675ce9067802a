"""The OpenAI-compatible server on the bundled model, driven by the official `openai` client (and a WebSocket)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from websockets.sync.client import connect

from lmport.engine import SamplingParams
from tests.http_helpers import TEST_ENGINE, model_server

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def server():
    running = model_server()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_completion_matches_the_in_process_engine_greedy(server, client) -> None:
    reply = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8,
                                      temperature=0)
    llm = server.state.backend.service.get_llm(server.state.backend.ref)
    expected = llm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0),
                            use_tqdm=False)[0].outputs[0]
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8 and reply.usage.prompt_tokens == len(llm.tokenize(
        "The capital of France is"))


def test_completion_batch_token_ids_echo_and_logprobs(server, client) -> None:
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "The sky is"}).json()["tokens"]
    by_ids = client.completions.create(model="smollm2", prompt=[ids, ids], max_tokens=4, temperature=0)
    by_text = client.completions.create(model="smollm2", prompt=["The sky is", "Once upon a time"], max_tokens=4,
                                        temperature=0, echo=True, logprobs=2)
    assert [c.index for c in by_text.choices] == [0, 1]
    assert by_ids.choices[0].text == by_ids.choices[1].text == by_text.choices[0].text.removeprefix("The sky is")
    second = by_text.choices[1]
    assert second.text.startswith("Once upon a time")
    lp = second.logprobs
    assert lp.token_logprobs[0] is None  # the first prompt token has nothing before it
    prompt_tokens = by_text.usage.prompt_tokens - len(ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == prompt_tokens + 4
    generated = lp.top_logprobs[-1]
    assert 2 <= len(generated) <= 3 and lp.tokens[-1] in generated  # top-2 plus the sampled token
    assert "".join(lp.tokens) == second.text


def test_truncated_prompt_is_what_echo_logprobs_and_usage_show(server, client) -> None:
    prompt = "word " * (TEST_ENGINE["max_model_len"] + 50)  # too long for the model, whole
    reply = client.completions.create(model="smollm2", prompt=prompt, max_tokens=2, temperature=0, echo=True,
                                      logprobs=1, extra_body={"truncate_prompt_tokens": 6})
    choice = reply.choices[0]
    assert reply.usage.prompt_tokens == 6
    assert len(choice.logprobs.tokens) == 6 + 2 and choice.logprobs.token_logprobs[0] is None
    assert "".join(choice.logprobs.tokens) == choice.text and choice.text.startswith(" word" * 5 + " ")


def test_chat_n_stop_and_logprobs(client) -> None:
    reply = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_completion_tokens=12, n=3,
                                           temperature=0.9, seed=7, logprobs=True, top_logprobs=2)
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    for choice in reply.choices:
        assert choice.message.role == "assistant"
        tokens = choice.logprobs.content
        assert "".join(t.token for t in tokens) == choice.message.content
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens)
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)
    greedy = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=24, temperature=0)
    word = greedy.choices[0].message.content.split()[1]
    stopped = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=24, temperature=0,
                                             stop=[word])
    assert stopped.choices[0].finish_reason == "stop" and word not in stopped.choices[0].message.content
    assert greedy.choices[0].message.content.startswith(stopped.choices[0].message.content)


def test_seeded_sampling_is_reproducible(client) -> None:
    def sample(seed: int) -> str:
        return client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=16, temperature=1.0,
                                              seed=seed).choices[0].message.content
    assert sample(11) == sample(11)
    assert len({sample(11), sample(12), sample(13)}) > 1


def test_streaming_deltas_concatenate_to_the_whole_reply_with_usage(client) -> None:
    whole = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    completion_stream = client.completions.create(model="smollm2", prompt="1, 2, 3,", max_tokens=6, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
    parts = list(completion_stream)
    assert parts[-1].usage.completion_tokens == 6
    assert "".join(p.choices[0].text for p in parts if p.choices) == client.completions.create(
        model="smollm2", prompt="1, 2, 3,", max_tokens=6, temperature=0).choices[0].text


def test_typed_errors_from_the_engine(server, client) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="smollm2", prompt=[10**7], max_tokens=2)
    assert err.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=MESSAGES, n=2, temperature=0)
    assert err.value.param == "n"
    too_long = "word " * TEST_ENGINE["max_model_len"]
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": too_long, "max_tokens": 1})
    assert response.status_code == 413 and response.json()["error"]["param"] == "prompt"


def test_tokenize_detokenize_round_trip(server) -> None:
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == TEST_ENGINE["max_model_len"]
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt":
                                                                                                 "Hello world"}
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES}).json()
    assert chat["count"] > tokens["count"]
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [-1]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    broken = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES, "chat_template": "{% if %}"})
    assert broken.status_code == 400 and broken.json()["error"]["param"] == "chat_template"


def test_websocket_streams_chat_deltas(server, client) -> None:
    whole = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=10, temperature=0)
    with connect(server.url.replace("http", "ws") + "/v1/chat/completions") as ws:
        for _ in range(2):  # two requests, one after the other, on one socket
            ws.send(json.dumps({"model": "smollm2", "messages": MESSAGES, "max_tokens": 10, "temperature": 0}))
            messages = []
            while True:
                message = json.loads(ws.recv(timeout=120))
                messages.append(message)
                if message.get("object") == "chat.completion.done":
                    break
            assert messages[0]["choices"][0]["delta"]["role"] == "assistant"
            text = "".join(m["choices"][0]["delta"].get("content", "") for m in messages[:-1])
            assert text == whole.choices[0].message.content
            assert messages[-1]["usage"]["completion_tokens"] == whole.usage.completion_tokens
        ws.send(json.dumps({"messages": MESSAGES, "temperature": 9}))
        assert json.loads(ws.recv(timeout=30))["error"]["param"] == "temperature"

