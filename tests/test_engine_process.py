"""engine_process='on' (lmport.engine.engine_process): the engine in a child process behaves as the thread-mode
engine does (outputs, streaming order, abort, errors with their fields, EngineDead, shutdown), and no child outlives
its LLM or the bridge worker hosting it."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from lmport.engine.engine_process import pack_error, unpack_error
from lmport.engine.errors import InvalidParams, ModelNotFound, Unsupported
from lmport.engine.llm import LLM, EngineDead
from lmport.engine.sampling_params import RequestOutputKind, SamplingParams
from tests.model_harness import write_tiny_model_dir
from tests.test_engine_tensor_parallel import none_alive, rank_processes, worker_client  # noqa: F401
from tests.tiny_models import TINY_ENGINE, wait_for

PROMPTS = ["the quick brown fox jumps over", "hello", [5, 6, 7, 8, 9], {"prompt": "a dict prompt"}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)


def engine_children(pid: int) -> list[psutil.Process]:
    """The live engine processes started under process `pid`."""
    return [child for child in psutil.Process(pid).children(recursive=True) if _is_engine_process(child)]


def _is_engine_process(proc: psutil.Process) -> bool:
    try:
        return "lmport.engine.engine_process" in proc.cmdline() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-engine-process")
    write_tiny_model_dir(path)
    return path


@pytest.fixture(scope="module")
def off(model_dir: Path) -> Iterator[LLM]:
    with LLM(str(model_dir), engine_process="off", **TINY_ENGINE) as llm:
        yield llm


@pytest.fixture(scope="module")
def on(model_dir: Path) -> Iterator[LLM]:
    with LLM(str(model_dir), engine_process="on", **TINY_ENGINE) as llm:
        yield llm


def token_ids(outputs: list) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_the_engine_runs_in_a_child_and_reports_its_facts(on: LLM, off: LLM) -> None:
    (child,) = engine_children(os.getpid())
    assert on.engine.pid == child.pid and psutil.Process(child.pid).ppid() == os.getpid()
    assert os.getpgid(child.pid) == os.getpgrp()  # the clients kill the group
    assert on.config.engine_process == "on" and off.config.engine_process == "off"
    assert on.config.replace(engine_process="off") == off.config
    for name in ("model_path", "dtype", "device", "vocab_size", "max_model_len"):
        assert getattr(on.engine, name) == getattr(off.engine, name), name
    assert (on.max_model_len, on.num_kv_blocks, on.is_encoder) == (off.max_model_len, off.num_kv_blocks, False)
    assert on.memory_footprint() == off.memory_footprint()
    assert on.stats().keys() == off.stats().keys()


def test_greedy_and_seeded_outputs_match_thread_mode(on: LLM, off: LLM) -> None:
    seeded = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=10, seed=7)
    for params in (GREEDY, seeded):
        expected = off.generate(PROMPTS, params, use_tqdm=False)
        got = on.generate(PROMPTS, params, use_tqdm=False)
        assert token_ids(got) == token_ids(expected)
        assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in expected]
        assert [o.outputs[0].finish_reason for o in got] == ["length"] * len(PROMPTS)


def test_chat_tokenize_and_embed_match_thread_mode(on: LLM, off: LLM) -> None:
    messages = [{"role": "user", "content": "hi there"}]
    assert on.apply_chat_template(messages) == off.apply_chat_template(messages)
    assert token_ids(on.chat(messages, GREEDY, use_tqdm=False)) == token_ids(off.chat(messages, GREEDY, use_tqdm=False))
    assert on.tokenize("abc") == off.tokenize("abc") and on.detokenize([70, 71]) == off.detokenize([70, 71])
    got, expected = on.embed(["one", "two words"]), off.embed(["one", "two words"])
    assert [e.embedding for e in got] == [e.embedding for e in expected]


def test_streaming_delivers_each_request_in_order_ending_with_finished(on: LLM, off: LLM) -> None:
    params = GREEDY.clone(output_kind=RequestOutputKind.DELTA)
    seen: dict[str, list] = {}

    for llm in (off, on):
        events: list = []
        done = threading.Event()

        def record(index: int, output, events=events, done=done) -> None:  # noqa: ANN001
            events.append((index, output))
            if sum(o.finished for _, o in events) == 2:
                done.set()

        llm.add_requests(PROMPTS[:2], [params, params], on_output=record)
        assert done.wait(30)
        seen[llm.config.engine_process] = events
    for index in (0, 1):
        mine = {mode: [o for i, o in events if i == index] for mode, events in seen.items()}
        for outputs in mine.values():
            assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        assert [t for o in mine["on"] for t in o.outputs[0].token_ids] == \
            [t for o in mine["off"] for t in o.outputs[0].token_ids]
    stream = on.add_request("hello", params)
    assert [t for o in stream for t in o.outputs[0].token_ids] == token_ids(off.generate("hello", GREEDY,
                                                                                          use_tqdm=False))[0]


def test_abort_finishes_with_abort_and_frees_the_blocks(on: LLM) -> None:
    total = on.stats()["kv_blocks_total"]
    stream = on.add_request("a long story", LONG.clone(output_kind=RequestOutputKind.DELTA), request_id="long")
    outputs = iter(stream)
    next(outputs)
    assert on.abort("long")
    assert [o.outputs[0].finish_reason for o in outputs][-1] == "abort"
    assert not on.abort("long") and not on.abort("never-added")
    stats = wait_for(lambda: (s := on.stats())["kv_blocks_free"] == total and s, what="the blocks freed")
    assert stats["num_running"] == 0 and stats["finish_reasons"].get("abort", 0) >= 1


def test_errors_cross_the_process_with_type_field_message_and_index(on: LLM, off: LLM) -> None:
    for llm in (off, on):
        with pytest.raises(InvalidParams) as info:
            llm.add_requests(["fine", [10**9], "fine"], [GREEDY] * 3)
        assert info.value.field == "prompt_token_ids" and info.value.index == 1 and "vocabulary" in info.value.message
        with pytest.raises(InvalidParams) as single:
            llm.add_request([10**9], GREEDY)
        assert single.value.index is None and str(single.value) == str(info.value)
        with pytest.raises(InvalidParams) as checked:  # checked against the engine's max_logprobs (20)
            llm.add_request("x", SamplingParams(logprobs=50))
        assert checked.value.field == "logprobs"
        stream = llm.add_request("hi", LONG, request_id="dup")
        with pytest.raises(InvalidParams, match="already in flight") as dup:
            llm.add_request("hi", GREEDY, request_id="dup")
        assert dup.value.field == "request_id"
        stream.abort()
        stream.result()
    assert on.stats()["num_waiting"] == 0  # nothing of a refused batch was queued


def test_error_packing_keeps_attributes_and_falls_back_for_unpicklable_classes() -> None:
    exc = InvalidParams("top_p", "must be <= 1")
    exc.index = 3
    back = unpack_error(pack_error(exc))
    assert type(back) is InvalidParams and (back.field, back.message, back.index, str(back)) == \
        ("top_p", "must be <= 1", 3, str(exc))
    back = unpack_error(pack_error(Unsupported("swap_space", "no")))
    assert type(back) is Unsupported and back.field == "swap_space"

    class Local(Exception):
        pass

    back = unpack_error(pack_error(Local("boom")))
    assert type(back) is RuntimeError and str(back) == "Local: boom"


def test_a_load_error_is_raised_from_the_constructor_and_leaves_no_child(tmp_path: Path) -> None:
    before = engine_children(os.getpid())  # the module's engine, when it runs
    with pytest.raises(ModelNotFound):
        LLM(str(tmp_path / "missing"), engine_process="on")
    with pytest.raises(Unsupported) as info:  # refused by EngineConfig before any child starts
        LLM("smollm2", engine_process="on", swap_space=1)
    assert info.value.field == "swap_space"
    assert engine_children(os.getpid()) == before


def test_a_killed_child_fails_every_request_in_flight_with_engine_dead(model_dir: Path) -> None:
    llm = LLM(str(model_dir), engine_process="on", **TINY_ENGINE)
    child = psutil.Process(llm.engine.pid)
    errors: list = []
    streams = llm.add_requests(["one", "two"], [LONG, LONG])
    callback = llm.add_request("three", LONG, on_output=lambda o: None, on_error=errors.append)
    assert callback.request_id
    os.kill(llm.engine.pid, signal.SIGKILL)
    start = time.monotonic()
    for stream in streams:
        with pytest.raises(EngineDead, match="SIGKILL"):
            stream.result()
    wait_for(lambda: errors, what="on_error")
    assert isinstance(errors[0], EngineDead)
    with pytest.raises(EngineDead):
        llm.add_request("later", GREEDY)
    assert not llm.abort(streams[0].request_id)
    assert llm.stats().keys() >= {"num_running"}  # the last counters, as a dead thread-mode engine's
    llm.shutdown()
    assert time.monotonic() - start < 10 and not child.is_running()  # reaped


def test_shutdown_finishes_every_request_and_the_child_exits(model_dir: Path) -> None:
    llm = LLM(str(model_dir), engine_process="on", **TINY_ENGINE)
    child = psutil.Process(llm.engine.pid)
    streams = llm.add_requests(["one", "two"], [LONG, LONG])
    llm.shutdown()
    assert [s.result().outputs[0].finish_reason for s in streams] == ["abort", "abort"]
    assert none_alive([child], timeout=5)
    with pytest.raises(EngineDead, match="shutting down"):
        llm.add_request("later", GREEDY)
    llm.shutdown()  # idempotent


@pytest.mark.slow
def test_composes_with_tensor_parallel_and_a_dead_rank_fails_the_engine(model_dir: Path, off: LLM) -> None:
    llm = LLM(str(model_dir), engine_process="on", tensor_parallel_size=2, **TINY_ENGINE)
    try:
        child = psutil.Process(llm.engine.pid)
        (rank,) = rank_processes(child.pid)  # the child is rank 0 and started rank 1
        assert rank.ppid() == child.pid
        assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == \
            token_ids(off.generate(PROMPTS, GREEDY, use_tqdm=False))
        stream = llm.add_request("long", LONG)
        os.kill(rank.pid, signal.SIGKILL)  # the child's step fails: the engine dies, the child stays
        with pytest.raises(EngineDead, match="engine step failed"):
            stream.result()
        with pytest.raises(EngineDead):
            llm.add_request("later", GREEDY)
    finally:
        llm.shutdown()
    assert none_alive([child], timeout=5)


@pytest.mark.slow
def test_no_child_outlives_the_worker_when_the_host_sigkills_it(worker_client, model_dir: Path) -> None:  # noqa: ANN001
    llm = worker_client.llm(str(model_dir), engine_process="on", **TINY_ENGINE)
    out = worker_client.generate(llm, "hello", {"max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert len(out[0]["outputs"][0]["token_ids"]) == 8
    assert worker_client.stats(llm)["memory_bytes"] > 0  # measured in the child
    (child,) = engine_children(worker_client.process.pid)
    assert os.getpgid(child.pid) == worker_client.process.pid  # the worker leads its group
    os.kill(worker_client.process.pid, signal.SIGKILL)
    assert none_alive([child], timeout=5)


@pytest.mark.slow
def test_a_worker_shutdown_stops_the_child(worker_client, model_dir: Path) -> None:  # noqa: ANN001
    llm = worker_client.llm(str(model_dir), engine_process="on", **TINY_ENGINE)
    stream = iter(worker_client.generate(llm, "a story", {"max_tokens": 100, "ignore_eos": True}, stream=True))
    next(stream)
    (child,) = engine_children(worker_client.process.pid)
    assert worker_client.call("shutdown") == {"shutting_down": True}
    assert worker_client.process.wait(15) == 0
    assert none_alive([child], timeout=5)


@pytest.mark.slow
def test_ping_bench_measures_both_sides_while_every_generation_runs() -> None:
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "lmport.bridge.cli", "bench", "ping", "--rounds", "1",
                          "--generations", "4", "--max-tokens", "64", "--pings", "10", "--json"],
                         capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(run.stdout)
    (measured,) = result["rounds"]
    for mode in ("off", "on"):
        assert measured[mode]["pings"] == 10 and measured[mode]["output_tokens"] == 4 * 64
        assert 0 < measured[mode]["p50_ms"] <= measured[mode]["p99_ms"] <= measured[mode]["max_ms"]
    assert result["p99_ratio"] == pytest.approx(measured["on"]["p99_ms"] / measured["off"]["p99_ms"])
