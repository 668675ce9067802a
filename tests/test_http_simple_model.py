"""The simple endpoints on the bundled model over real sockets: /generate whole and streamed (httpx, and curl as a
person would call it), /chat, a /v1/completions/batch the scheduler runs as one batch, and a closed /generate
stream aborting its engine request."""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import pytest

from tests.http_helpers import engine_stats, model_server, parse_sse, wait_idle

pytestmark = pytest.mark.slow

GREEDY = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server():
    running = model_server()
    yield running
    running.stop()


def check_stream(events: list[tuple[str, dict]], whole: dict) -> None:
    *deltas, (name, final) = events
    assert name == "final" and deltas and all(n == "message" for n, _ in deltas)
    assert "".join(d["text"] for _, d in deltas) == final["text"] == whole["text"]  # greedy: the same text
    counts = [d["tokens_generated"] for _, d in deltas]
    assert counts == sorted(counts) and counts[-1] == final["tokens_generated"] == GREEDY["max_tokens"]
    assert final["tokens_per_second"] > 0 and final["generation_time"] > 0


def test_generate_whole_and_streamed_agree(server) -> None:
    body = {"prompt": "The lighthouse keeper", **GREEDY}
    whole = httpx.post(f"{server.url}/generate", json=body, timeout=120).json()
    assert whole["text"] and whole["tokens_generated"] == GREEDY["max_tokens"] and whole["finish_reason"] == "length"
    assert whole["tokens_per_second"] == pytest.approx(whole["tokens_generated"] / whole["generation_time"])
    with httpx.stream("POST", f"{server.url}/generate", json={**body, "stream": True}, timeout=120) as response:
        check_stream(parse_sse(list(response.iter_lines())), whole)


def test_generate_streams_to_curl(server) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is part of the toolchains (make toolchains installs it)"
    body = {"prompt": "The lighthouse keeper", **GREEDY}
    whole = httpx.post(f"{server.url}/generate", json=body, timeout=120).json()
    out = subprocess.run([curl, "-sS", "-N", "--fail-with-body", "-H", "Content-Type: application/json",
                          "-d", json.dumps({**body, "stream": True}), f"{server.url}/generate"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    check_stream(parse_sse(out.splitlines()), whole)


def test_chat_answers_through_the_template(server) -> None:
    reply = httpx.post(f"{server.url}/chat", json={"messages": [{"role": "user", "content": "Say hi."}],
                                                   "max_tokens": 8, "temperature": 0}, timeout=120).json()
    assert reply["text"] and 0 < reply["tokens_generated"] <= 8 and reply["prompt_tokens"] > 3


def test_batch_runs_its_prompts_as_one_batch(server) -> None:
    prompts = [f"Fact {i} about the sea:" for i in range(8)]
    before = wait_idle(server)
    body = httpx.post(f"{server.url}/v1/completions/batch", json={"prompts": prompts, **GREEDY}, timeout=300).json()
    after = wait_idle(server)
    assert [r["index"] for r in body["results"]] == list(range(8))
    assert all(r["text"] and r["tokens_generated"] == GREEDY["max_tokens"] for r in body["results"])
    assert body["tokens_generated"] == 8 * GREEDY["max_tokens"]
    assert after["requests_finished"] - before["requests_finished"] == 8
    # one after another would take 8 x 12 steps; batched, about one prefill and 11 decode steps
    assert after["steps"] - before["steps"] < 2 * GREEDY["max_tokens"], after["steps"] - before["steps"]


def test_closing_a_generate_stream_aborts_the_engine_request(server) -> None:
    before = wait_idle(server)
    body = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/generate", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert [next(lines) for _ in range(4)]  # a few tokens in: it is running
        assert engine_stats(server)["num_running"] == 1
    stats = wait_idle(server)
    assert stats["requests_aborted"] == before["requests_aborted"] + 1
    assert stats["generation_tokens_total"] - before["generation_tokens_total"] < 500
