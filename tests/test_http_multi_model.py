"""Several models behind one server (`lmport serve --model a --model b`), keep_alive unloading and reloading them,
and the memory budget: real uvicorn servers on loopback sockets over the real service, with tiny random-init
models (each loads in well under a second)."""

from __future__ import annotations

import argparse
import gc
import json
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from lmport.bridge.http.config import add_arguments, load_settings
from lmport.bridge.http.server import RunningServer
from lmport.engine.errors import InvalidParams
from tests.tiny_models import TINY_ENGINE, tiny_model_dirs, wait_for

FOOTPRINT_MIB = 1.4  # a tiny model: ~0.4 MiB of float32 weights + its 1 MiB KV cache
ONE_MODEL_BUDGET_GB = 2 / 1024  # 2 MiB: room for one tiny model, not two


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return tiny_model_dirs(tmp_path_factory.mktemp("models"), 2)


@contextmanager
def serving(model_dirs: list[str], **options: Any) -> Iterator[RunningServer]:
    """A server of both tiny models, named "a" and "b", with its own service (so its own memory budget)."""
    settings = load_settings({"port": 0, "uvicorn_log_level": "warning", **TINY_ENGINE, "model": model_dirs,
                              "served_model_name": ["a", "b"], **options}, environ={})
    server = RunningServer(settings).wait_ready(60)
    try:
        yield server
    finally:
        server.stop()


def listed(server: RunningServer) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}


def engine(server: RunningServer, name: str) -> dict[str, Any]:
    """The /stats entry of the engine serving `name`."""
    ref = server.state.by_name[name].backend.ref
    return next(e for e in httpx.get(f"{server.url}/stats").json()["engines"] if ref in e["refs"])


def complete(server: RunningServer, model: str, **fields: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", timeout=60,
                      json={"model": model, "prompt": "hello", "max_tokens": 4, "temperature": 0, **fields})


def test_several_models_from_flags_yaml_and_the_environment(tmp_path: Any) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "a", "--model", "b", "--keep-alive", "300", "--memory-budget-gb", "0.5"])
    settings = load_settings(args, environ={})
    assert settings.served == [(["a"], "a"), (["b"], "b")]
    assert settings.engine == {"model": "a", "keep_alive": 300.0}
    assert settings.engine_for("b") == {"model": "b", "keep_alive": 300.0}
    assert settings.memory_budget_bytes == 1 << 29
    config = tmp_path / "serve.yaml"
    config.write_text("model: [a, b]\nserved_model_name: [x, y]\nkeep_alive: -1\n")
    assert load_settings({"config": str(config)}, environ={}).served == [(["x"], "a"), (["y"], "b")]
    assert load_settings({}, environ={"LMPORT_MODEL": "a,b"}).models == ["a", "b"]
    assert load_settings({"served_model_name": ["x", "y"]}, environ={}).served == [(["x", "y"], "smollm2")]
    with pytest.raises(InvalidParams) as mismatch:
        load_settings({"model": ["a", "b"], "served_model_name": ["x"]}, environ={})
    assert mismatch.value.field == "served_model_name"
    with pytest.raises(InvalidParams) as same:
        load_settings({"model": ["a", "a"]}, environ={})
    assert same.value.field == "model"


def test_two_models_answer_by_name_and_are_listed(model_dirs: list[str]) -> None:
    with serving(model_dirs) as server:
        models = listed(server)
        assert list(models) == ["a", "b"]
        assert [models[n]["root"] for n in "ab"] == model_dirs
        assert all(models[n]["loaded"] and models[n]["ready"] and models[n]["max_model_len"] == 128 for n in "ab")
        for name in "ab":
            reply = complete(server, name)
            assert reply.status_code == 200, reply.text
            assert reply.json()["model"] == name
            assert reply.json()["usage"]["completion_tokens"] == 4
        # each request ran on its own model's engine
        assert engine(server, "a")["engine"] != engine(server, "b")["engine"]
        assert engine(server, "a")["generation_tokens_total"] == engine(server, "b")["generation_tokens_total"] == 4
        unknown = complete(server, "c")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "model_not_found"
        assert "'a'" in unknown.json()["error"]["message"] and "'b'" in unknown.json()["error"]["message"]
        health = httpx.get(f"{server.url}/health").json()
        assert health["models"] == {"a": {"ready": True, "error": None}, "b": {"ready": True, "error": None}}


def test_keep_alive_unloads_an_idle_model_and_the_next_request_reloads_it(model_dirs: list[str]) -> None:
    with serving(model_dirs, keep_alive=0.3) as server:
        service = server.state.backend.service
        first = weakref.ref(service.get_llm(server.state.by_name["a"].backend.ref))
        wait_for(lambda: not listed(server)["a"]["loaded"], what="model a to unload")
        stats = engine(server, "a")
        assert stats["loaded"] is False and stats["memory_bytes"] == 0 and "num_running" not in stats
        gc.collect()
        assert first() is None, "the unloaded engine (its weights and KV cache) is still referenced"

        loads = stats["loads"]
        reply = complete(server, "a")  # waits for the reload
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 4
        assert engine(server, "a")["loads"] == loads + 1
        wait_for(lambda: not listed(server)["a"]["loaded"], what="model a to unload again")


def test_keep_alive_never_cuts_a_stream_in_flight(model_dirs: list[str]) -> None:
    """keep_alive 0 unloads as soon as nothing holds the engine: a stream (and the tokenize call before its
    generate) must hold it throughout, so the request loads it once and gets every token."""
    with serving(model_dirs, keep_alive=0) as server:
        wait_for(lambda: not engine(server, "a")["loaded"], what="model a to unload after startup")
        loads = engine(server, "a")["loads"]
        body = {"model": "a", "prompt": "hi", "max_tokens": 100, "ignore_eos": True, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        chunks = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[len("data: "):]))
                time.sleep(0.002)  # a slow reader
        assert chunks[-1]["usage"]["completion_tokens"] == 100
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        wait_for(lambda: not engine(server, "a")["loaded"], what="model a to unload after the stream")
        assert engine(server, "a")["loads"] == loads + 1  # one load for the whole request, none mid-stream


def test_memory_budget_unloads_the_least_recently_used_idle_model(model_dirs: list[str]) -> None:
    with serving(model_dirs, memory_budget_gb=ONE_MODEL_BUDGET_GB) as server:
        # loading b at startup made room by unloading a (idle)
        models = listed(server)
        assert (models["a"]["loaded"], models["b"]["loaded"]) == (False, True)
        assert complete(server, "a").status_code == 200
        models = listed(server)
        assert (models["a"]["loaded"], models["b"]["loaded"]) == (True, False)
        service = httpx.get(f"{server.url}/stats").json()["service"]
        assert service["memory_budget_bytes"] == 2 << 20
        assert FOOTPRINT_MIB * 0.8 < service["memory_in_use_bytes"] / (1 << 20) < 2


def test_memory_budget_refuses_with_the_numbers_while_the_other_model_is_busy(model_dirs: list[str]) -> None:
    with serving(model_dirs, memory_budget_gb=ONE_MODEL_BUDGET_GB) as server:
        release = server.state.by_name["b"].backend.hold()  # b is serving something: it may not be unloaded
        try:
            refused = complete(server, "a")
        finally:
            release()
        assert refused.status_code == 503
        error = refused.json()["error"]
        assert error["code"] == "memory_budget_exceeded"
        assert "2.0 MiB (2097152 bytes)" in error["message"]  # the budget
        assert "weights" in error["message"] and "KV cache 1.0 MiB (1048576 bytes)" in error["message"]
        assert "busy" in error["message"]
        assert listed(server)["b"]["loaded"]  # nothing was unloaded for a load that could not happen
        assert complete(server, "a").status_code == 200  # once b is idle, it makes room
