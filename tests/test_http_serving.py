"""Serving behaviour on the bundled model: concurrent streams are batched, a client that goes away gets its request
aborted and its KV blocks freed, /metrics counters move, and `lmport bench serve` runs against the server."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from lmport.bridge.http import bench
from tests.http_helpers import TEST_ENGINE, engine_stats, model_server, wait_idle

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Tell me a long story about a lighthouse."}]
LONG = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    running = model_server()
    yield running
    running.stop()


def metric_samples(server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_32_concurrent_streams_complete_and_are_batched(server) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    async def one(i: int) -> tuple[str, int]:
        stream = await client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=12,
            temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, usage = "", 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, usage

    async def all_of_them() -> list[tuple[str, int]]:
        return await asyncio.gather(*(one(i) for i in range(32)))

    before = engine_stats(server)
    results = asyncio.run(all_of_them())
    assert all(usage == 12 and text for text, usage in results)
    stats = wait_idle(server)
    assert stats["requests_finished"] - before["requests_finished"] == 32
    assert stats["max_num_running"] >= 8  # continuous batching, not 32 requests one after the other


ABORTED = ("lmport:request_success_total", (("finished_reason", "abort"), ("model_name", "smollm2")))


def test_client_closing_a_stream_aborts_its_request_and_frees_blocks(server) -> None:
    before = wait_idle(server)
    aborted_before = metric_samples(server).get(ABORTED, 0.0)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions",
                      json={"messages": MESSAGES, "stream": True, **LONG}, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]  # a few tokens in: it is running
    assert all(line.startswith("data: ") or not line for line in received)
    stats = wait_idle(server)
    assert stats["requests_aborted"] == before["requests_aborted"] + 1
    generated = stats["generation_tokens_total"] - before["generation_tokens_total"]
    assert generated < LONG["max_tokens"] / 3, generated  # stopped soon after the client left
    assert metric_samples(server)[ABORTED] == aborted_before + 1


def test_client_giving_up_on_a_whole_response_aborts_it(server) -> None:
    before = wait_idle(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={"prompt": "Once upon a time", **LONG}, timeout=2.0)
    stats = wait_idle(server)
    assert stats["requests_aborted"] == before["requests_aborted"] + 1
    assert stats["generation_tokens_total"] - before["generation_tokens_total"] < LONG["max_tokens"] / 3


def test_websocket_closed_mid_stream_aborts_its_request(server) -> None:
    before = wait_idle(server)
    with connect(server.url.replace("http", "ws") + "/v1/chat/completions") as ws:
        ws.send(json.dumps({"messages": MESSAGES, **LONG}))
        for _ in range(4):
            assert "choices" in json.loads(ws.recv(timeout=60))
    stats = wait_idle(server)
    assert stats["requests_aborted"] == before["requests_aborted"] + 1
    assert stats["generation_tokens_total"] - before["generation_tokens_total"] < LONG["max_tokens"] / 3


def test_metrics_parse_and_counters_move(server) -> None:
    model = (("model_name", "smollm2"),)
    before = metric_samples(server)
    reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": "The sea", "max_tokens": 5,
                                                             "temperature": 0, "ignore_eos": True},
                       timeout=60).json()
    after = metric_samples(server)

    def moved(name: str, labels: tuple = model) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert moved("lmport:generation_tokens_total") == 5
    assert moved("lmport:prompt_tokens_total") == reply["usage"]["prompt_tokens"]
    assert moved("lmport:request_success_total", (("finished_reason", "length"), *model)) == 1
    for histogram in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert moved(f"lmport:{histogram}_seconds_count") == 1
    assert moved("lmport:inter_token_latency_seconds_count") == 4
    assert moved("lmport:prefix_cache_queries_total") >= 0 and ("lmport:num_requests_running", model) in after
    assert 0.0 <= after[("lmport:kv_cache_usage_perc", model)] <= 1.0


def test_bench_serve_reports_vllm_style_metrics(server) -> None:
    args = argparse.Namespace(base_url=server.url, endpoint="/v1/chat/completions", model=None, api_key=None,
                              num_prompts=6, max_tokens=6, min_prompt_len=4, max_prompt_len=12, max_concurrency=3,
                              request_rate=20.0, seed=0, json=True)
    summary = asyncio.run(bench.run_benchmark(args))
    assert summary["successful_requests"] == 6 and summary["failed_requests"] == 0
    assert summary["total_output_tokens"] == 36
    assert summary["output_throughput"] > 0 and summary["mean_ttft_ms"] > 0
    assert 0 < summary["median_itl_ms"] <= summary["p99_itl_ms"]
    assert summary["mean_e2el_ms"] >= summary["mean_ttft_ms"]
    assert "Output token throughput" in bench.render(summary)


def test_lmport_serve_command_starts_loads_and_stops_on_sigint(tmp_path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("port: 0\nserved_model_name: [tiny, smollm2]\nuvicorn_log_level: warning\n")
    proc = subprocess.Popen([sys.executable, "-m", "lmport.bridge.cli", "serve", "--config", str(config),
                             "--kv-cache-memory-bytes", str(TEST_ENGINE["kv_cache_memory_bytes"]),
                             "--max-model-len", "512"], stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{bound_port(proc)}"
        statuses = []
        end = time.monotonic() + 120
        while time.monotonic() < end:
            try:
                statuses.append(httpx.get(f"{url}/health").status_code)
            except httpx.TransportError:
                pass
            if statuses and statuses[-1] == 200:
                break
            time.sleep(0.05)
        assert statuses[-1] == 200 and 503 in statuses, statuses  # it answered while loading
        reply = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2},
                           timeout=60).json()
        assert reply["model"] == "tiny" and reply["usage"]["completion_tokens"] == 2
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["max_model_len"] == 512
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()



def bound_port(proc: subprocess.Popen) -> int:
    """The port `lmport serve` (port 0) says it bound, read from its log on stderr."""
    for line in proc.stderr:
        found = re.search(r"serving .* on http://[^\s]+:(\d+)$", line.rstrip())
        if found:
            return int(found.group(1))
    raise AssertionError(f"lmport serve exited ({proc.wait()}) without saying its port")
