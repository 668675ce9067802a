"""distributed_executor_backend='ray' (lmport.engine.ray_executor): tensor-parallel ranks as Ray actors on a local
Ray started for the engine compute what tp=1 does, and no Ray process outlives the engine (shutdown, a failed
construction, the bridge worker SIGKILLed). Ray starts in seconds: one Ray-backed engine serves most tests."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import ray

from lmport.engine.errors import OutOfKVCache
from lmport.engine.llm import LLM
from tests.test_engine_tensor_parallel import (GREEDY, OPTIONS, SEEDED, assert_greedy_outputs_match,  # noqa: F401
                                               assert_logits_match, generate_recording_logits, model_dir, none_alive,
                                               worker_client)

RAY = {"distributed_executor_backend": "ray"}


def ray_processes(pid: int) -> list[psutil.Process]:
    """The live processes of a Ray started under process `pid`: gcs_server, the raylet and its agents and workers,
    Ray's Python helpers, lmport's watchdog."""
    found = []
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
            if proc.status() != psutil.STATUS_ZOMBIE and (
                    proc.name() in ("gcs_server", "raylet") or proc.name().startswith("ray::")
                    or "/site-packages/ray/" in cmdline or "lmport.engine.ray_watchdog" in cmdline):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> dict[str, tuple[list, list]]:
    """tp=1 outputs; 'ray' with tensor_parallel_size 1 runs the engine in its own process, without Ray."""
    with LLM(str(model_dir), tensor_parallel_size=1, **OPTIONS, **RAY) as llm:
        assert not ray.is_initialized() and not ray_processes(os.getpid())
        return {"greedy": generate_recording_logits(llm, GREEDY), "seeded": generate_recording_logits(llm, SEEDED)}


@pytest.fixture(scope="module")
def ray_llm(model_dir: Path, reference: dict) -> Iterator[LLM]:  # noqa: ARG001 — the reference runs first, Ray-free
    llm = LLM(str(model_dir), tensor_parallel_size=2, **OPTIONS, **RAY)
    yield llm
    llm.shutdown()  # test_shutdown_leaves_no_ray_process did already, unless it was deselected


def test_ray_tp2_logits_and_greedy_tokens_match_tp1(ray_llm: LLM, reference: dict) -> None:
    outputs, logits = generate_recording_logits(ray_llm, GREEDY)
    assert_logits_match(reference["greedy"][1], logits)
    assert_greedy_outputs_match(reference["greedy"][0], outputs)


def test_ray_tp2_seeded_sampling_matches_tp1(ray_llm: LLM, reference: dict) -> None:
    outputs, _ = generate_recording_logits(ray_llm, SEEDED)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in reference["seeded"][0]]


def test_the_ranks_are_actors_of_a_local_ray(ray_llm: LLM) -> None:
    from lmport.engine.ray_executor import RayRank

    (rank,) = ray_llm.engine.runner.tp.procs
    assert isinstance(rank, RayRank) and rank.poll() is None
    assert psutil.Process(rank.pid).name() == "ray::_Rank.run"
    names = {p.name() for p in ray_processes(os.getpid())}
    assert {"gcs_server", "raylet", "ray::_Rank.run"} <= names
    assert "lmport.engine.tp_worker" not in str([p.cmdline() for p in psutil.Process().children(recursive=True)])


def test_shutdown_leaves_no_ray_process(ray_llm: LLM) -> None:  # shuts the shared engine down: keep it last of them
    procs = ray_processes(os.getpid())
    (rank,) = ray_llm.engine.runner.tp.procs
    ray_llm.shutdown()
    assert rank.returncode == 0  # asked to stop, not killed
    assert not ray.is_initialized()
    assert none_alive(procs, timeout=5), [(p.pid, p.name()) for p in procs if p.is_running()]


def test_a_failed_construction_leaves_no_ray_process(model_dir: Path) -> None:
    with pytest.raises(OutOfKVCache):  # raised on rank 0 after the rank actor started
        LLM(str(model_dir), tensor_parallel_size=2, **{**OPTIONS, "kv_cache_memory_bytes": 1024}, **RAY)
    assert not ray.is_initialized()
    assert not ray_processes(os.getpid())  # killed and reaped before the error reached here


@pytest.mark.slow
def test_no_ray_process_outlives_the_worker_when_the_host_sigkills_it(worker_client, model_dir: Path) -> None:  # noqa: ANN001
    llm = worker_client.llm(str(model_dir), tensor_parallel_size=2, **OPTIONS, **RAY)
    out = worker_client.generate(llm, "hello", {"max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert len(out[0]["outputs"][0]["token_ids"]) == 8
    procs = ray_processes(worker_client.process.pid)
    names = {p.name() for p in procs}
    assert {"gcs_server", "raylet", "ray::_Rank.run", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, names
    os.kill(worker_client.process.pid, signal.SIGKILL)
    assert none_alive(procs, timeout=15), [(p.pid, p.name()) for p in procs if p.is_running()]
