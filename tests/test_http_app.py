"""The HTTP layer on a real uvicorn server over a scripted backend (no model): loading, auth, CORS, limits, errors,
rate limiting and the SSE framing, driven by httpx and the official openai client."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from lmport.bridge.protocol import BridgeError
from tests.http_helpers import FakeBackend, fake_server

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def server():
    running, _ = fake_server()
    running.wait_ready()
    yield running
    running.stop()


def test_health_is_503_while_loading_then_200() -> None:
    running, backend = fake_server(FakeBackend(loaded=False))
    try:
        response = httpx.get(f"{running.url}/health")
        assert response.status_code == 503
        assert response.json() == {"status": "loading", "model": "smollm2", "ready": False}
        refused = httpx.post(f"{running.url}/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "model_loading"
        backend.loaded.set()
        running.wait_ready(10)
        assert httpx.get(f"{running.url}/health").json() == {"status": "ok", "model": "smollm2", "ready": True}
    finally:
        running.stop()


def test_version_and_models(server) -> None:
    assert httpx.get(f"{server.url}/version").json()["version"]
    models = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none").models.list()
    assert [m.id for m in models.data] == ["smollm2"]


def test_errors_name_the_parameter(server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    cases = [({"temperature": 3.0}, "temperature"), ({"top_logprobs": 2}, "top_logprobs"),
             ({"max_completion_tokens": 0}, "max_completion_tokens"), ({"n": "two"}, "n"),
             ({"extra_body": {"tempurature": 1}}, "tempurature"), ({"max_tokens": 60}, "max_tokens")]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**{**CHAT, **extra})
        assert err.value.param == param, (extra, err.value.body)
        assert err.value.body["param"] == param and param in err.value.body["message"]
    response = httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers={"content-type":
                                                                                         "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(**{**CHAT, "model": "gpt-4"})
    assert err.value.code == "model_not_found" and err.value.param == "model"


def test_413_for_long_prompts_and_large_bodies() -> None:
    running, _ = fake_server(max_body_bytes=2000)
    try:
        running.wait_ready()
        long_prompt = httpx.post(f"{running.url}/v1/completions", json={"prompt": "y" * 100, "max_tokens": 1})
        assert long_prompt.status_code == 413 and long_prompt.json()["error"]["param"] == "prompt"
        big = httpx.post(f"{running.url}/v1/completions", json={"prompt": "y" * 5000})
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"

        def chunked():
            for _ in range(10):
                yield b" " * 500
        streamed = httpx.post(f"{running.url}/v1/completions", content=chunked(),
                              headers={"content-type": "application/json"})
        assert streamed.status_code == 413
    finally:
        running.stop()


def test_api_keys_guard_v1_and_tokenize_but_not_health_or_metrics() -> None:
    running, _ = fake_server(api_key=["k1", "k2"])
    try:
        running.wait_ready()
        url = running.url
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 200
        assert httpx.post(f"{url}/tokenize", json={"prompt": "ab"}).status_code == 401
        assert httpx.post(f"{url}/tokenize", json={"prompt": "ab"},
                          headers={"Authorization": "Bearer k2"}).json()["tokens"] == [97, 98]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).chat.completions.create(**CHAT)
        reply = openai.OpenAI(base_url=f"{url}/v1", api_key="k1").chat.completions.create(**CHAT)
        assert reply.choices[0].message.content == "xxx"
    finally:
        running.stop()


def test_cors_preflight_answers_allowed_origin() -> None:
    running, _ = fake_server(allowed_origins=["https://app.example"])
    try:
        running.wait_ready()
        response = httpx.options(f"{running.url}/v1/chat/completions",
                                 headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(f"{running.url}/v1/chat/completions",
                              headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        running.stop()


def test_rate_limits_answer_429_with_retry_after_per_key() -> None:
    running, _ = fake_server(api_key=["a", "b"], rate_limit_rpm=2)
    try:
        running.wait_ready()
        client_a = openai.OpenAI(base_url=f"{running.url}/v1", api_key="a", max_retries=0)
        client_a.chat.completions.create(**CHAT)
        client_a.chat.completions.create(**CHAT)
        with pytest.raises(openai.RateLimitError) as err:
            client_a.chat.completions.create(**CHAT)
        assert int(err.value.response.headers["retry-after"]) >= 1
        assert err.value.code == "rate_limit_exceeded"
        openai.OpenAI(base_url=f"{running.url}/v1", api_key="b", max_retries=0).chat.completions.create(**CHAT)
    finally:
        running.stop()
    running, _ = fake_server(rate_limit_tpm=30)
    try:
        running.wait_ready()
        ok = httpx.post(f"{running.url}/v1/completions", json={"prompt": "abc", "max_tokens": 20})
        assert ok.status_code == 200
        over = httpx.post(f"{running.url}/v1/completions", json={"prompt": "abc", "max_tokens": 20})
        assert over.status_code == 429 and "tokens" in over.json()["error"]["message"]
    finally:
        running.stop()


def test_sse_stream_frames_role_content_usage_done(server) -> None:
    with httpx.stream("POST", f"{server.url}/v1/chat/completions",
                      json={**CHAT, "n": 2, "temperature": 1.0, "stream": True,
                            "stream_options": {"include_usage": True}}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert {c["choices"][0]["delta"].get("content") for c in chunks[2:4]} == {"xxx"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks[:-1])


def test_websocket_auth_by_header_or_query_key() -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    running, _ = fake_server(api_key=["k1"])
    try:
        running.wait_ready()
        url = running.url.replace("http", "ws") + "/v1/chat/completions"
        with connect(url) as ws:
            assert json.loads(ws.recv(timeout=10))["error"]["code"] == "invalid_api_key"
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd.code == 1008
        for kwargs, target in (({"additional_headers": {"Authorization": "Bearer k1"}}, url),
                               ({}, url + "?api_key=k1")):
            with connect(target, **kwargs) as ws:
                ws.send(json.dumps(CHAT))
                messages = [json.loads(ws.recv(timeout=10)) for _ in range(3)]
                assert messages[1]["choices"][0]["delta"] == {"content": "xxx"}
                assert messages[2]["object"] == "chat.completion.done"
    finally:
        running.stop()


def test_a_refused_content_part_names_its_message(server) -> None:
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]}]
    for path, body in (("/v1/chat/completions", {**CHAT, "messages": messages}), ("/tokenize", {"messages": messages})):
        response = httpx.post(f"{server.url}{path}", json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "messages[1].content[1]"


def test_a_prompt_that_never_fits_the_kv_cache_names_messages_on_chat() -> None:
    running, backend = fake_server()
    try:
        running.wait_ready()
        backend.refuse = BridgeError("out_of_memory", "the prompt can never fit the KV cache")
        for path, body, param in (("/v1/chat/completions", CHAT, "messages"),
                                  ("/v1/completions", {"prompt": "ab", "max_tokens": 2}, "prompt")):
            response = httpx.post(f"{running.url}{path}", json=body)
            assert response.status_code == 413, response.text
            assert response.json()["error"]["param"] == param, (path, response.json())
    finally:
        running.stop()


def test_chat_template_errors_are_400_and_service_errors_keep_their_status() -> None:
    running, backend = fake_server()
    try:
        running.wait_ready()
        url = running.url
        chat = {**CHAT, "max_tokens": 2}
        for template in ("{% for m in messages %}", "{{ raise_exception('roles must alternate') }}", "{{ 1 / 0 }}"):
            for path, body in (("/v1/chat/completions", {**chat, "chat_template": template}),
                               ("/tokenize", {"messages": CHAT["messages"], "chat_template": template})):
                response = httpx.post(f"{url}{path}", json=body)
                assert response.status_code == 400, (path, template, response.text)
                error = response.json()["error"]
                assert error["param"] == "chat_template" and "chat template failed" in error["message"], error
        assert httpx.post(f"{url}/tokenize", json={"messages": CHAT["messages"], "chat_template":
                                                   "{{ messages[0].content }}"}).json()["tokens"] == [104, 105]
        backend.chat_error = ValueError("this tokenizer has no chat template")
        response = httpx.post(f"{url}/v1/chat/completions", json=chat)
        assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
        for error, status, code in ((BridgeError("shutting_down", "the worker is shutting down"), 503, "shutting_down"),
                                    (BridgeError("not_found", "unknown handle", {"field": "llm"}), 404, "not_found"),
                                    (RuntimeError("a bug"), 500, "internal")):
            backend.chat_error = error
            for path, body in (("/v1/chat/completions", chat), ("/tokenize", {"messages": CHAT["messages"]})):
                response = httpx.post(f"{url}{path}", json=body)
                assert response.status_code == status, (path, error, response.text)
                assert response.json()["error"]["code"] == code
    finally:
        running.stop()


def test_a_batch_of_text_prompts_is_tokenized_in_order() -> None:
    running, backend = fake_server()
    try:
        running.wait_ready()
        reply = httpx.post(f"{running.url}/v1/completions", json={"prompt": ["ab", "cde", "f"], "max_tokens": 1})
        assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == 6
        assert backend.submitted[-1][0] == [[97, 98], [99, 100, 101], [102]]
    finally:
        running.stop()


def test_min_tokens_is_checked_against_the_max_tokens_the_request_gets(server) -> None:
    messages = CHAT["messages"]  # "user:hi;": 8 tokens of the fake's 64, so up to 56 may be generated
    reply = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": messages, "min_tokens": 20})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 56
    reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": "abcd", "max_tokens": None, "min_tokens": 20})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 60, reply.text
    for body, param in (({"messages": messages, "min_tokens": 57}, "min_tokens"),
                        ({"messages": messages, "max_completion_tokens": 5, "min_tokens": 6}, "min_tokens"),
                        ({"messages": messages, "max_completion_tokens": 0}, "max_completion_tokens")):
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, (body, refused.text)
    refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "abcd", "min_tokens": 20})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "min_tokens"  # max_tokens: 16


def test_truncate_prompt_tokens_counts_what_the_engine_runs(server) -> None:
    # 100 tokens do not fit the fake's 64, their last 10 do; the default max_tokens leaves room for them
    reply = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "z" * 100}],
                                                                 "truncate_prompt_tokens": 10})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"] == {"prompt_tokens": 10, "completion_tokens": 54, "total_tokens": 64}
    running, backend = fake_server(rate_limit_tpm=60)
    try:
        running.wait_ready()
        # the rate limiter charges the truncated prompt (5 + 20, twice within 60), not the whole one (40 + 20)
        for _ in range(2):
            reply = httpx.post(f"{running.url}/v1/completions", json={"prompt": "q" * 40, "max_tokens": 20,
                                                                      "truncate_prompt_tokens": 5})
            assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == 5, reply.text
            assert [len(p) for p in backend.submitted[-1][0]] == [5]
    finally:
        running.stop()


def test_echo_with_truncate_prompt_tokens_shows_the_prompt_the_model_saw(server) -> None:
    reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": ["abcdefghij", "klm"], "max_tokens": 2,
                                                             "echo": True, "logprobs": 0,
                                                             "truncate_prompt_tokens": 4}).json()
    first, second = reply["choices"]
    assert first["text"] == "ghijxx" and second["text"] == "klmxx"
    for choice in (first, second):
        logprobs = choice["logprobs"]
        assert "".join(logprobs["tokens"]) == choice["text"]
        assert logprobs["token_logprobs"][0] is None and logprobs["token_logprobs"][1:] == [-1.0] * (
            len(choice["text"]) - 1)
    assert reply["usage"]["prompt_tokens"] == 7


class _RefusedFromAnotherThread(FakeBackend):
    """submit() has the refusal answered on another thread, which reads the generation's state just before submit
    returns and is held there (as a preempted thread would be) until the event loop took submit's result."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = threading.Event()  # the other thread has looked at the generation and is held
        self.assigned = threading.Event()  # the event loop stored what submit returned

    def submit(self, prompts, sampling, on_chunk, on_done, lora_request=None):
        refusal = BridgeError("invalid_params", "prompts: refused", {"field": "prompts"})
        threading.Thread(target=on_done, args=(None, refusal), name="refuser").start()
        self.reading.wait(1)  # (code that never looks is not held: the refusal has long arrived)
        return lambda: None


def test_a_refusal_answered_on_another_thread_while_submitting_is_never_lost(monkeypatch) -> None:
    from lmport.bridge.http.generation import Generation

    backend = _RefusedFromAnotherThread()
    slot = Generation.__dict__["_cancel"]

    def get(generation):
        value = slot.__get__(generation)
        if value is None and threading.current_thread().name == "refuser":
            backend.reading.set()
            backend.assigned.wait(2)
            time.sleep(0.3)  # the event loop has run on past storing it
        return value

    def put(generation, value):
        slot.__set__(generation, value)
        if value is not None:
            backend.assigned.set()

    monkeypatch.setattr(Generation, "_cancel", property(get, put))
    running, _ = fake_server(backend)
    try:
        running.wait_ready()
        response = httpx.post(f"{running.url}/v1/completions", json={"prompt": "ab", "max_tokens": 2}, timeout=10)
        assert response.status_code == 400 and response.json()["error"]["param"] == "prompt", response.text
    finally:
        running.stop()


class _BrokenLoad(FakeBackend):
    def load(self) -> None:
        raise RuntimeError("no weights here")


def test_failed_load_and_unknown_path_answer_as_documented(server) -> None:
    missing = httpx.get(f"{server.url}/v1/nothing-here")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error" and missing.json()["error"]["code"] is None
    running, _ = fake_server(_BrokenLoad())
    try:
        end = time.monotonic() + 10
        while running.state.load_error is None and time.monotonic() < end:
            time.sleep(0.02)
        health = httpx.get(f"{running.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        refused = httpx.post(f"{running.url}/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_load_failed"
    finally:
        running.stop()


class _FailsMidStream(FakeBackend):
    """One chunk of text, then the engine fails (on its own thread, after submit returned)."""

    def submit(self, prompts, sampling, on_chunk, on_done, lora_request=None):
        def later() -> None:
            time.sleep(0.05)
            on_chunk({"index": 0, "outputs": [{"index": 0, "text": "x", "token_ids": [120], "finish_reason": None,
                                               "stop_reason": None}], "finished": False})
            on_done(None, BridgeError("engine_error", "a step raised"))

        threading.Thread(target=later).start()
        return lambda: None


def test_streams_frame_usage_echo_and_a_late_error_as_events() -> None:
    def events(url: str, body: dict) -> list:
        with httpx.stream("POST", url, json={**body, "stream": True}) as response:
            lines = [line.removeprefix("data: ") for line in response.iter_lines() if line]
        assert lines[-1] == "[DONE]"
        return [json.loads(line) for line in lines[:-1]]

    running, _ = fake_server()
    try:
        running.wait_ready()
        chunks = events(f"{running.url}/v1/completions", {"prompt": "ab", "max_tokens": 2, "echo": True,
                                                          "stream_options": {"include_usage": True}})
        assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["abxx"]
        assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks[:-1])
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 4
    finally:
        running.stop()
    running, _ = fake_server(_FailsMidStream())
    try:
        running.wait_ready()
        for path, body in (("/v1/completions", {"prompt": "ab", "max_tokens": 2}), ("/v1/chat/completions", CHAT)):
            chunks = events(f"{running.url}{path}", body)
            assert chunks[-1]["error"]["code"] == "engine_error" and chunks[-1]["error"]["type"] == "server_error"
            texts = [c["choices"][0].get("text", c["choices"][0].get("delta", {}).get("content")) for c in chunks[:-1]]
            assert texts[-1] == "x"
    finally:
        running.stop()
