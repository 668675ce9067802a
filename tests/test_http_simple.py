"""lmport's simple endpoints (/generate, /chat, /models, /v1/completions/batch) on a real uvicorn server over the
scripted backend (no model): reply shapes, SSE framing, one engine call per batch, errors naming the field, auth
and rate limits as on /v1."""

from __future__ import annotations

import httpx
import pytest

from tests.http_helpers import fake_server, parse_sse

# generous: the scripted backend answers at once, but a shared 2-core machine can stall a thread for seconds
http = httpx.Client(timeout=30)


@pytest.fixture(scope="module")
def served():
    running, backend = fake_server()
    running.wait_ready()
    yield running, backend
    running.stop()


def test_generate_answers_text_counts_and_timing(served) -> None:
    server, backend = served
    reply = http.post(f"{server.url}/generate", json={"prompt": "abc", "max_tokens": 4, "temperature": 0.5})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["text"] == "xxxx" and body["tokens_generated"] == 4 and body["prompt_tokens"] == 3
    assert body["finish_reason"] == "length" and body["model"] == "smollm2" and body["request_id"].startswith("gen-")
    assert body["generation_time"] > 0 and body["tokens_per_second"] == pytest.approx(4 / body["generation_time"])
    prompts, sampling = backend.submitted[-1]
    assert prompts == [[97, 98, 99]] and sampling["temperature"] == 0.5 and sampling["max_tokens"] == 4


def test_generate_defaults_to_sampling_params_max_tokens(served) -> None:
    server, backend = served
    assert http.post(f"{server.url}/generate", json={"prompt": "a"}).json()["tokens_generated"] == 16
    assert backend.submitted[-1][1]["max_tokens"] == 16


def test_generate_streams_text_events_then_a_final_event(served) -> None:
    server, _ = served
    with http.stream("POST", f"{server.url}/generate", json={"prompt": "ab", "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.iter_lines())
    *deltas, (final_name, final) = events
    assert final_name == "final" and [name for name, _ in deltas] == ["message"] * len(deltas)
    assert all(set(data) == {"text", "request_id", "tokens_generated"} for _, data in deltas)
    assert "".join(data["text"] for _, data in deltas) == final["text"] == "xxx"
    assert deltas[-1][1]["tokens_generated"] == final["tokens_generated"] == 3
    assert {data["request_id"] for _, data in deltas} == {final["request_id"]}
    assert final["finish_reason"] == "length" and final["tokens_per_second"] > 0


def test_chat_goes_through_the_chat_template(served) -> None:
    server, backend = served
    body = http.post(f"{server.url}/chat", json={"messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 2}).json()
    assert body["text"] == "xx" and body["prompt_tokens"] == len("user:hi;")
    assert backend.submitted[-1][0] == [[ord(c) for c in "user:hi;"]]
    with http.stream("POST", f"{server.url}/chat", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 2, "stream": True}) as r:
        assert parse_sse(r.iter_lines())[-1][0] == "final"
    # without max_tokens the reply may run to the end of the context (the fake's 64 tokens), as on /v1
    assert http.post(f"{server.url}/chat", json={"messages": [{"role": "user", "content": "hi"}]}).json()[
        "tokens_generated"] == 64 - len("user:hi;")


def test_batch_is_one_engine_call_answered_in_prompt_order(served) -> None:
    server, backend = served
    calls = len(backend.submitted)
    body = http.post(f"{server.url}/v1/completions/batch", json={"prompts": ["a", "bb", "ccc"],
                                                                  "max_tokens": 2}).json()
    assert len(backend.submitted) == calls + 1  # one call: the scheduler batches its prompts
    assert backend.submitted[-1][0] == [[97], [98, 98], [99, 99, 99]]
    assert [(r["index"], r["text"], r["tokens_generated"]) for r in body["results"]] == [
        (0, "xx", 2), (1, "xx", 2), (2, "xx", 2)]
    assert body["tokens_generated"] == 6 and body["prompt_tokens"] == 6 and body["tokens_per_second"] > 0


def test_models_lists_the_served_names(served) -> None:
    server, _ = served
    assert http.get(f"{server.url}/models").json() == {
        "models": [{"name": "smollm2", "root": "smollm2", "ready": True, "loaded": True, "max_model_len": 64}]}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions/batch", {"prompts": []}, "prompts"),
    ("/v1/completions/batch", {"prompts": ["a", ""]}, "prompts[1]"),
    ("/v1/completions/batch", {"prompts": ["a", "b" * 40], "max_tokens": 30}, "max_tokens"),  # 70 > 64
    ("/generate", {"prompt": "a" * 60, "max_tokens": 10}, "max_tokens"),
    ("/generate", {"prompt": ""}, "prompt"),
    ("/generate", {"prompt": "a", "temperature": -1}, "temperature"),
    ("/generate", {"prompt": "a", "tempurature": 1}, "tempurature"),
    ("/generate", {"prompt": "a", "max_tokens": "many"}, "max_tokens"),
    ("/generate", {"prompt": "a", "n": 2}, "n"),
    ("/generate", {"prompt": "a", "logprobs": 1}, "logprobs"),
    ("/chat", {"messages": []}, "messages"),
    ("/chat", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
])
def test_bad_input_is_a_400_naming_the_field(served, path, body, param) -> None:
    server, _ = served
    response = http.post(f"{server.url}{path}", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == "invalid_params" and param in error["message"], error


def test_a_prompt_with_no_room_for_output_is_413_naming_it(served) -> None:
    server, _ = served
    response = http.post(f"{server.url}/v1/completions/batch", json={"prompts": ["a", "b" * 80]})
    assert response.status_code == 413 and response.json()["error"]["param"] == "prompts[1]"


def test_auth_and_rate_limits_apply_as_on_v1() -> None:
    running, _ = fake_server(api_key=["k1"], rate_limit_rpm=2)
    try:
        running.wait_ready()
        url = running.url
        for method, path, body in (("POST", "/generate", {"prompt": "a"}), ("GET", "/models", None),
                                   ("POST", "/chat", {"messages": [{"role": "user", "content": "a"}]}),
                                   ("POST", "/v1/completions/batch", {"prompts": ["a"]})):
            refused = http.request(method, f"{url}{path}", json=body)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key", path
        key = {"Authorization": "Bearer k1"}
        assert http.get(f"{url}/models", headers=key).status_code == 200
        assert http.post(f"{url}/generate", json={"prompt": "a"}, headers=key).status_code == 200
        assert http.post(f"{url}/v1/completions/batch", json={"prompts": ["a"]}, headers=key).status_code == 200
        over = http.post(f"{url}/generate", json={"prompt": "a"}, headers=key)
        assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1
    finally:
        running.stop()
