"""keep_alive and the memory budget in the service and over the stdio worker's pipes, with tiny random-init models:
an idle engine unloads after its TTL and its handle reloads it on the next call; loads that do not fit the budget
unload idle engines, least recently used first, or are refused with the numbers."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from lmport.bridge.budget import Resident, evictions
from lmport.bridge.footprint import Footprint
from lmport.bridge.protocol import BridgeError
from lmport.bridge.service import Service
from tests.bridge_helpers import RawWorker
from tests.tiny_models import TINY_ENGINE, tiny_model_dirs, wait_for

MiB = 1 << 20


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return tiny_model_dirs(tmp_path_factory.mktemp("models"), 3)


@pytest.fixture
def service() -> Iterator[Service]:
    service = Service(memory_budget_bytes=3 * MiB)  # two tiny models (~1.4 MiB each), not three
    yield service
    service.close()


def _engine(stats: dict[str, Any], handle: dict[str, Any]) -> dict[str, Any]:
    return next(e for e in stats["engines"] if handle["ref"] in e["refs"])


# --- the budget's decision, alone ---

def test_evictions_take_idle_models_least_recently_used_first() -> None:
    need = Footprint(weights_bytes=3 * MiB, kv_cache_bytes=1 * MiB)
    loaded = [Resident("new", "m-new", 4 * MiB, False, idle_since=30.0),
              Resident("busy", "m-busy", 4 * MiB, True, idle_since=10.0),
              Resident("old", "m-old", 4 * MiB, False, idle_since=20.0)]
    assert evictions("m", need, 16 * MiB, loaded) == []  # 12 + 4 fit
    assert [r.engine for r in evictions("m", need, 13 * MiB, loaded)] == ["old"]
    assert [r.engine for r in evictions("m", need, 9 * MiB, loaded)] == ["old", "new"]


def test_a_load_that_cannot_fit_is_refused_with_the_numbers() -> None:
    need = Footprint(weights_bytes=3 * MiB, kv_cache_bytes=1 * MiB)
    with pytest.raises(BridgeError) as refused:
        evictions("m", need, 6 * MiB, [Resident("busy", "m-busy", 4 * MiB, True, 0.0)])
    error = refused.value
    assert error.code == "memory_budget_exceeded" and error.retryable  # it fits once m-busy is idle
    assert error.details == {"weights_bytes": 3 * MiB, "kv_cache_bytes": MiB, "total_bytes": 4 * MiB,
                             "required_bytes": 4 * MiB, "in_use_bytes": 4 * MiB, "budget_bytes": 6 * MiB,
                             "loaded": [{"model": "m-busy", "bytes": 4 * MiB, "busy": True}]}
    assert "4.0 MiB (4194304 bytes)" in error.message and "6.0 MiB (6291456 bytes)" in error.message
    with pytest.raises(BridgeError) as alone:
        evictions("m", need, 3 * MiB, [])
    assert not alone.value.retryable and "cannot fit even alone" in alone.value.message


# --- the service, in process ---

def test_keep_alive_zero_unloads_after_each_call_and_the_handle_reloads(model_dirs: list[str]) -> None:
    service = Service()
    events: list[tuple[str, Any]] = []
    service.on_event = lambda name, data: events.append((name, data.get("reason")))
    try:
        handle = service.llm(model=model_dirs[0], keep_alive=0, **TINY_ENGINE)
        wait_for(lambda: not _engine(service.stats(), handle)["loaded"], what="the unload after llm()")
        for _ in range(2):
            assert _run(service, "tokenize", {"llm": handle, "text": "hi"}) == [71, 72]  # reloads for the call
            wait_for(lambda: not _engine(service.stats(), handle)["loaded"], what="the unload after the call")
        assert _engine(service.stats(), handle)["loads"] == 3
        wait_for(lambda: len(events) == 6, what="the last model_unloaded event")  # sent after the unload
        assert events == [("model_loaded", None), ("model_unloaded", "keep_alive")] * 3
    finally:
        service.close()


def test_the_budget_unloads_the_least_recently_used_idle_engine(service: Service, model_dirs: list[str]) -> None:
    a, b = (service.llm(model=path, **TINY_ENGINE) for path in model_dirs[:2])
    assert _run(service, "tokenize", {"llm": a, "text": "a is now the most recently used"})
    c = service.llm(model=model_dirs[2], **TINY_ENGINE)  # no room for three: b goes, the least recently used
    stats = service.stats()
    assert [_engine(stats, h)["loaded"] for h in (a, b, c)] == [True, False, True]
    assert stats["service"]["memory_in_use_bytes"] <= 3 * MiB
    assert _run(service, "detokenize", {"llm": b, "token_ids": [71, 72]}) == "hi"  # b reloads, making room
    assert [_engine(service.stats(), h)["loaded"] for h in (a, b, c)] == [False, True, True]


# --- over the worker's pipes ---

@pytest.mark.slow  # a worker process: torch and the engine start from nothing
def test_worker_llm_keep_alive_unloads_and_the_next_call_reloads(model_dirs: list[str]) -> None:
    worker = RawWorker()
    try:
        loaded = worker.call(1, "llm", {"model": model_dirs[0], "keep_alive": 0.3, **TINY_ENGINE}, timeout=60)
        assert loaded["ok"], loaded
        handle = loaded["result"]
        assert handle["config"]["keep_alive"] == 0.3
        params = {"llm": handle["ref"], "prompts": "hello", "sampling_params": {"max_tokens": 3, "temperature": 0}}
        first = worker.call(2, "generate", params, timeout=60)
        assert first["ok"] and len(first["result"][0]["outputs"][0]["token_ids"]) == 3

        ids = itertools.count(100)

        def engine() -> dict[str, Any]:
            return worker.call(next(ids), "health")["result"]["engines"][0]

        wait_for(lambda: not engine()["loaded"], what="the worker's engine to unload")
        unloaded = engine()
        assert unloaded["memory_bytes"] == 0 and unloaded["loads"] == 1 and "num_running" not in unloaded

        again = worker.call(3, "generate", params, timeout=60)  # the same handle: reloaded for this call
        assert again["ok"], again
        assert again["result"][0]["outputs"][0]["token_ids"] == first["result"][0]["outputs"][0]["token_ids"]
        assert engine()["loads"] == 2
    finally:
        worker.close()


@pytest.mark.slow  # a worker process: torch and the engine start from nothing
def test_worker_memory_budget_refuses_a_model_that_cannot_fit(model_dirs: list[str]) -> None:
    worker = RawWorker("--memory-budget-gb", "0.001")  # ~1.0 MiB: less than one tiny model
    try:
        refused = worker.call(1, "llm", {"model": model_dirs[0], **TINY_ENGINE}, timeout=60)
        assert not refused["ok"]
        error = refused["error"]
        assert error["code"] == "memory_budget_exceeded" and error["retryable"] is False
        details = error["details"]
        assert details["budget_bytes"] == int(0.001 * (1 << 30))
        assert details["kv_cache_bytes"] == MiB and details["weights_bytes"] > 0
        assert details["required_bytes"] == details["weights_bytes"] + details["kv_cache_bytes"]
        assert details["in_use_bytes"] == 0 and details["loaded"] == []
        assert worker.call(2, "health")["result"]["engines"] == []  # nothing was loaded
    finally:
        worker.close()


def _run(service: Service, method: str, params: dict[str, Any]) -> Any:
    """One non-streaming call through the service's admission path (holds, reloads), waited for."""
    import asyncio

    return asyncio.run(service.acall(method, params))
