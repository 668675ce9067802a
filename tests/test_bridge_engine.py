"""The worker serving the bundled SmolLM2 (fp32, greedy) through the Python shim: every method, batching of
concurrent callers, streaming, cancellation, deadlines, heartbeats under load and the error shapes."""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time

import pytest

from lmport.bridge.client import AsyncClient, Client
from lmport.bridge.protocol import BridgeError
from lmport.bridge.results import results_schema
from tests.bridge_helpers import REPO, conforms, spawn_shim

pytestmark = pytest.mark.slow

OPTIONS = {"dtype": "float32", "kv_cache_memory_bytes": 256 << 20, "max_model_len": 2048}
GREEDY = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}
LONG = {"temperature": 0.0, "max_tokens": 1500, "ignore_eos": True}
WORDS = "river boats towns engineers water notes pressure bridges centuries stone quiet careful".split()
PROMPTS = [f"Story {i}: the {WORDS[i % 12]} and the {WORDS[(i * 5) % 12]} were" for i in range(64)]


@pytest.fixture(scope="module")
def client():
    yield from spawn_shim()


@pytest.fixture(scope="module")
def llm(client):
    return client.llm("smollm2", **OPTIONS)


_ENGINE_PROCESS: dict = {}


@pytest.fixture(params=["auto", "on"])
def any_llm(request, client, llm):
    """The module's engine, then the same model with engine_process 'on' (loaded by the first test that asks, in
    the same worker: no test reordering)."""
    if request.param == "auto":
        return llm
    if "on" not in _ENGINE_PROCESS:
        _ENGINE_PROCESS["on"] = client.llm("smollm2", engine_process="on", **OPTIONS)
        assert _ENGINE_PROCESS["on"]["engine"] != llm["engine"]
    return _ENGINE_PROCESS["on"]


def wait_idle(client: Client, llm, timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        stats = client.stats(llm)
        if stats["num_running"] == 0 and stats["num_waiting"] == 0 or time.monotonic() > end:
            return stats
        time.sleep(0.05)


def test_llm_handle_and_same_options_share_one_engine(client, llm):
    assert llm["ref"].startswith("llm-") and llm["model"] == "smollm2" and llm["dtype"] == "float32"
    assert llm["device"] == "cpu" and llm["max_model_len"] == 2048 and llm["num_kv_blocks"] > 0
    again = client.llm("smollm2", **OPTIONS)
    assert again["engine"] == llm["engine"] and again["ref"] != llm["ref"]
    assert client.release(again) == {"ref": again["ref"], "unloaded": False}
    with pytest.raises(BridgeError) as info:
        client.release(again["ref"])
    assert info.value.code == "not_found"
    health = client.health()
    assert health["status"] == "ok" and [e["engine"] for e in health["engines"]] == [llm["engine"]]


def test_sampling_params_are_normalized_and_bad_ones_name_the_field(client):
    params = client.sampling_params(temperature=0, max_tokens=5, logit_bias={"3": 1})
    assert params["temperature"] == 0.0 and params["max_tokens"] == 5 and params["top_p"] == 1.0
    assert params["output_kind"] == "cumulative" and params["logit_bias"] == {"3": 1.0}
    for bad, field in (({"temperature": -1}, "temperature"), ({"max_tokenz": 3}, "max_tokenz")):
        with pytest.raises(BridgeError) as info:
            client.sampling_params(**bad)
        assert info.value.code == "invalid_params" and info.value.details["field"] == field


def test_tokenize_detokenize_round_trip(client, any_llm):
    ids = client.tokenize(any_llm, "Hello, wörld 🚀")
    assert ids and all(isinstance(t, int) for t in ids)
    assert client.detokenize(any_llm["ref"], ids).endswith("Hello, wörld 🚀")


def test_64_threads_are_batched_and_match_the_in_process_engine(client, llm):
    from lmport.engine import LLM, SamplingParams

    results: list = [None] * len(PROMPTS)
    errors: list = []

    def call(i: int) -> None:
        try:
            results[i] = client.generate(llm, PROMPTS[i], GREEDY)[0]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    before = client.stats(llm)["requests_total"]
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = client.stats(llm)
    assert stats["requests_total"] - before == 64 and stats["max_num_running"] > 1
    with LLM("smollm2", **OPTIONS) as local:
        expected = local.generate(PROMPTS, SamplingParams(**GREEDY), use_tqdm=False)
    assert [r["outputs"][0]["token_ids"] for r in results] == [e.outputs[0].token_ids for e in expected]
    assert [r["outputs"][0]["text"] for r in results] == [e.outputs[0].text for e in expected]
    assert all(r["finished"] and r["outputs"][0]["finish_reason"] == "length" for r in results)


def _has_key(value, keys) -> bool:
    if isinstance(value, dict):
        return any(k in keys or _has_key(v, keys) for k, v in value.items())
    return isinstance(value, list) and any(_has_key(v, keys) for v in value)


def test_streaming_deltas_concatenate_to_the_full_text_and_the_summary_carries_none(client, any_llm):
    params = {"temperature": 0.0, "max_tokens": 12, "logprobs": 2}
    full = client.generate(any_llm, ["The capital of France is", "def add(a, b):"], params)
    stream = client.generate(any_llm, ["The capital of France is", "def add(a, b):"], params, stream=True)
    chunks = list(stream)  # the shim checks that seq counts 0, 1, 2, ... per request
    for index in (0, 1):
        mine = [c for c in chunks if c["index"] == index]
        assert mine[-1]["finished"] and all(not c["finished"] for c in mine[:-1])
        text = "".join(o["text"] for c in mine for o in c["outputs"])
        tokens = [t for c in mine for o in c["outputs"] for t in o["token_ids"]]
        assert text == full[index]["outputs"][0]["text"] and tokens == full[index]["outputs"][0]["token_ids"]
        logprobs = [p for c in mine for o in c["outputs"] for p in o["logprobs"]]
        assert len(logprobs) == len(tokens) and logprobs[0][0].keys() == {"token_id", "logprob", "rank",
                                                                          "decoded_token"}
    summary = stream.summary
    assert not _has_key(summary, {"text", "token_ids", "logprobs"})
    assert summary["usage"]["completion_tokens"] == sum(len(r["outputs"][0]["token_ids"]) for r in full)
    assert [r["outputs"][0]["finish_reason"] for r in summary["requests"]] == \
        [r["outputs"][0]["finish_reason"] for r in full]


def test_results_have_exactly_the_shapes_the_manifest_declares(client, llm):
    """Every key of real results, streamed and not, is declared in lmport.bridge.results (the clients' typed results are
    generated from it) and every declared key is there, with the declared type: the shapes cannot drift."""
    shapes = results_schema()
    params = {"max_tokens": 6, "n": 2, "temperature": 0.8, "seed": 3, "logprobs": 2, "prompt_logprobs": 1}
    results = [client.generate(llm, ["The sea", "def f(x):"], params),
               client.generate(llm, {"prompt_token_ids": [1, 2, 3]}, {**params, "n": 1, "stop": [" "]}),
               client.chat(llm, [{"role": "user", "content": "Hi"}], {"max_tokens": 4})]
    for result in results:
        assert conforms(result, "list[RequestOutput]", shapes) is None, conforms(result, "list[RequestOutput]", shapes)
    stream = client.generate(llm, "The sea", params, stream=True)
    chunks = list(stream)
    assert "prompt_logprobs" in chunks[0] and "logprobs" in chunks[0]["outputs"][0]  # the optional keys, present
    for chunk in chunks:
        assert conforms(chunk, "Chunk", shapes) is None, conforms(chunk, "Chunk", shapes)
    assert conforms(stream.summary, "Summary", shapes) is None, conforms(stream.summary, "Summary", shapes)


def test_chat_with_and_without_streaming(client, any_llm):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    params = {"temperature": 0.0, "max_tokens": 10}
    reply = client.chat(any_llm, messages, params)[0]
    assert reply["prompt"] is None and reply["outputs"][0]["text"]
    streamed = "".join(o["text"] for c in client.chat(any_llm, [messages], params, stream=True) for o in c["outputs"])
    assert streamed == reply["outputs"][0]["text"]
    with pytest.raises(BridgeError) as info:
        client.chat(any_llm, [{"content": "no role"}])
    assert info.value.code == "invalid_params" and info.value.details["field"] == "messages"


def _run_others(client: Client, llm, count: int) -> tuple[list[threading.Thread], list]:
    outcomes: list = []

    def call(i: int) -> None:
        try:
            outcomes.append(client.generate(llm, PROMPTS[i], {"temperature": 0.0, "max_tokens": 24,
                                                              "ignore_eos": True})[0])
        except BaseException as exc:  # noqa: BLE001
            outcomes.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    return threads, outcomes


def test_cancel_mid_stream_frees_blocks_and_others_finish(client, any_llm):
    total = client.stats(any_llm)["kv_blocks_total"]
    aborted = client.stats(any_llm)["requests_aborted"]
    threads, outcomes = _run_others(client, any_llm, 3)
    stream = client.generate(any_llm, "Write a very long story about the sea.", LONG, stream=True)
    received = 0
    with pytest.raises(BridgeError) as info:
        for _ in stream:
            received += 1
            if received == 3:
                stream.cancel()
    assert info.value.code == "cancelled" and not info.value.retryable
    assert info.value.details["usage"]["completion_tokens"] >= 3
    for t in threads:
        t.join()
    assert all(isinstance(o, dict) and o["outputs"][0]["finish_reason"] == "length" for o in outcomes)
    stats = wait_idle(client, any_llm)
    assert stats["kv_blocks_free"] == total and stats["requests_aborted"] == aborted + 1


def test_timeout_ms_200_aborts_in_the_engine_with_partial_usage(client, llm):
    total = client.stats(llm)["kv_blocks_total"]
    threads, outcomes = _run_others(client, llm, 3)
    start = time.monotonic()
    with pytest.raises(BridgeError) as info:
        client.generate(llm, "Write a very long story about the sea.", LONG, timeout=0.2)
    assert time.monotonic() - start < 5.0
    assert info.value.code == "deadline_exceeded" and "client_side" not in info.value.details
    assert info.value.details["usage"]["prompt_tokens"] > 0
    assert info.value.details["partial"][0]["outputs"][0]["finish_reason"] == "abort"
    for t in threads:
        t.join()
    assert all(isinstance(o, dict) and o["outputs"][0]["finish_reason"] == "length" for o in outcomes)
    assert wait_idle(client, llm)["kv_blocks_free"] == total


def test_ping_stays_under_100ms_while_32_generations_run(client, any_llm):
    threads, outcomes = _run_others(client, any_llm, 32)
    time.sleep(0.5)
    latencies = []
    while any(t.is_alive() for t in threads) and len(latencies) < 100:
        start = time.perf_counter()
        client.ping(len(latencies))
        latencies.append(time.perf_counter() - start)
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert len(latencies) >= 10 and client.stats(any_llm)["max_num_running"] >= 32
    assert max(latencies) < 0.1, f"slowest ping {max(latencies) * 1000:.1f} ms"
    assert all(isinstance(o, dict) for o in outcomes)


def test_bad_requests_name_the_problem_and_the_worker_keeps_serving(client, llm):
    cases = [
        (lambda: client.generate("llm-404", "hi"), "not_found", "llm"),
        (lambda: client.generate(llm, "hi", {"top_p": 7}), "invalid_params", "sampling_params.top_p"),
        (lambda: client.generate(llm, ["a", "b"], [{}]), "invalid_params", "sampling_params"),
        (lambda: client.generate(llm, "word " * 3000), "invalid_params", "prompts"),
        (lambda: client.generate(llm, [[1, 2], [3]]), "invalid_params", "prompts"),
        (lambda: client.call("generate", {"llm": llm, "prompts": "x", "extra": 1}), "invalid_params", "extra"),
        (lambda: client.call("tokenize", {"llm": llm}), "invalid_params", "text"),
        (lambda: client.detokenize(llm, [10**9]), "invalid_params", "token_ids"),
        (lambda: client.llm("no-such-model-anywhere"), "not_found", "model"),
        (lambda: client.llm("smollm2", dtype="float8"), "invalid_params", "dtype"),
        (lambda: client.call("tokenize", {"llm": llm, "text": "x"}, timeout_profile="nope"), "invalid_request", None),
    ]
    for run, code, field in cases:
        with pytest.raises(BridgeError) as info:
            run()
        assert info.value.code == code, info.value
        if field is not None:
            assert info.value.details["field"] == field, info.value
        assert info.value.python_type is None or "." in info.value.python_type
    assert client.ping(5)["n"] == 5


def test_a_bad_prompt_among_many_queues_none_of_them(client, any_llm):
    before = client.stats(any_llm)
    with pytest.raises(BridgeError) as info:
        client.generate(any_llm, ["a fine prompt", "word " * 3000, "another"], GREEDY)
    assert info.value.code == "invalid_params" and info.value.details["field"] == "prompts[1]", info.value
    client.generate(any_llm, "hi", {"max_tokens": 1})  # one step later: anything queued would have reached the engine
    after = client.stats(any_llm)
    assert after["requests_total"] == before["requests_total"] + 1
    assert after["requests_aborted"] == before["requests_aborted"]


def test_a_kv_cache_too_small_for_one_sequence_is_out_of_memory(client):
    with pytest.raises(BridgeError) as info:
        client.llm("smollm2", dtype="float32", kv_cache_memory_bytes=1 << 20, max_model_len=2048)
    assert info.value.code == "out_of_memory" and "kv_cache_memory_bytes" in info.value.message


def test_async_client_streams_and_leaving_early_cancels(llm):
    async def main() -> tuple[str, int]:
        async with await AsyncClient.spawn(cwd=str(REPO), stderr=tempfile.TemporaryFile()) as ac:
            handle = await ac.llm("smollm2", **OPTIONS)
            text = "".join([o["text"] async for c in ac.generate(handle, "Hi", GREEDY, stream=True)
                            for o in c["outputs"]])
            async for _ in ac.generate(handle, "A long story:", LONG, stream=True):
                break  # leaving the loop sends cancel
            for _ in range(100):
                stats = await ac.stats(handle)
                if stats["requests_aborted"] == 1:
                    break
                await asyncio.sleep(0.05)
            return text, stats["requests_aborted"]

    text, aborted = asyncio.run(main())
    assert text and aborted == 1


def test_breaking_out_of_a_stream_loop_cancels_the_request(client, llm):
    aborted = client.stats(llm)["requests_aborted"]
    for _ in client.generate(llm, "A long story:", LONG, stream=True):
        break
    end = time.monotonic() + 30
    while client.stats(llm)["requests_aborted"] == aborted and time.monotonic() < end:
        time.sleep(0.05)
    stats = wait_idle(client, llm)
    assert stats["requests_aborted"] == aborted + 1 and stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_shutdown_answers_in_flight_requests_then_exits_0(client, llm):
    chunks = iter(client.generate(llm, "A long story:", LONG, stream=True))
    next(chunks)
    assert client.call("shutdown") == {"shutting_down": True}
    with pytest.raises(BridgeError) as info:
        for _ in chunks:
            pass
    assert info.value.code == "shutting_down" and info.value.retryable
    assert client.process.wait(15) == 0
