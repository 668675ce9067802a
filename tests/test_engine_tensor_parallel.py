"""Tensor parallelism (lmport.engine.parallel, lmport.engine.tp_worker): tp=2 computes what tp=1 does, and no rank
process outlives its engine (shutdown, a failed load, the bridge worker SIGKILLed)."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from lmport.engine.errors import InvalidParams, Unsupported
from lmport.engine.llm import LLM, EngineDead
from lmport.engine.sampling_params import SamplingParams
from tests.bridge_helpers import REPO
from tests.model_harness import write_tiny_model_dir

PROMPTS = ["the quick brown fox jumps over", "hello", "a longer prompt that spans more than one KV block"]
OPTIONS = {"dtype": "float32", "kv_cache_memory_bytes": 1 << 24, "max_model_len": 128}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-tp")
    write_tiny_model_dir(path)  # 4 heads, 2 KV heads, 96 MLP channels: splits 2 ways
    return path


def rank_processes(pid: int) -> list[psutil.Process]:
    """The live tensor-parallel ranks started under process `pid`."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "lmport.engine.tp_worker" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            continue
    return found


def none_alive(procs: list[psutil.Process], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        alive = []
        for proc in procs:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                continue
        if not alive:
            return True
        time.sleep(0.05)
    return False


def run_engine(model_dir: Path, tp: int, params: list[SamplingParams]) -> tuple[list, list[torch.Tensor]]:
    llm = LLM(str(model_dir), tensor_parallel_size=tp, **OPTIONS)
    try:
        if tp > 1:
            assert len(rank_processes(os.getpid())) == tp - 1
        return generate_recording_logits(llm, params)
    finally:
        llm.shutdown()


def generate_recording_logits(llm: LLM, params: list[SamplingParams]) -> tuple[list, list[torch.Tensor]]:
    """Outputs for PROMPTS and every step's logits (read at the runner, rank 0's)."""
    logits: list[torch.Tensor] = []
    run = llm.engine.runner.run

    def recording(batch):  # noqa: ANN001, ANN202 — the runner's own signature
        step = run(batch)
        logits.append(step.logits.float().clone())
        return step

    llm.engine.runner.run = recording
    try:
        return llm.generate(PROMPTS, params, use_tqdm=False), logits
    finally:
        llm.engine.runner.run = run


GREEDY = [SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, prompt_logprobs=0, logprobs=3)] * 3
SEEDED = [SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=seed, ignore_eos=True)
          for seed in (1, 2, 3)]


def assert_logits_match(one: list[torch.Tensor], two: list[torch.Tensor]) -> None:
    assert len(one) == len(two) and len(one) > 1
    for a, b in zip(one, two):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()


def assert_greedy_outputs_match(one: list, two: list) -> None:
    for a, b in zip(one, two, strict=True):
        assert len(a.outputs[0].token_ids) == 32
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].text == b.outputs[0].text
        for pa, pb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert pa.keys() == pb.keys()
            assert all(abs(pa[t].logprob - pb[t].logprob) < 1e-4 for t in pa)


@pytest.fixture(scope="module")
def greedy(model_dir: Path) -> dict[int, tuple[list, list[torch.Tensor]]]:
    return {tp: run_engine(model_dir, tp, GREEDY) for tp in (1, 2)}


def test_tp2_logits_match_tp1(greedy: dict) -> None:
    assert_logits_match(greedy[1][1], greedy[2][1])


def test_tp2_greedy_tokens_and_logprobs_match_tp1(greedy: dict) -> None:
    assert_greedy_outputs_match(greedy[1][0], greedy[2][0])


def test_tp2_seeded_sampling_matches_tp1(model_dir: Path) -> None:
    one, _ = run_engine(model_dir, 1, SEEDED)
    two, _ = run_engine(model_dir, 2, SEEDED)
    assert [o.outputs[0].token_ids for o in one] == [o.outputs[0].token_ids for o in two]


def test_shutdown_stops_the_ranks(model_dir: Path) -> None:
    llm = LLM(str(model_dir), tensor_parallel_size=2, **OPTIONS)
    ranks = rank_processes(os.getpid())
    assert len(ranks) == 1
    llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)
    procs = llm.engine.runner.tp.procs
    llm.shutdown()
    assert none_alive(ranks, timeout=5)
    assert [p.returncode for p in procs] == [0]  # asked to stop, not killed


def test_heads_that_do_not_split_are_refused_before_any_rank_starts(tmp_path: Path) -> None:
    write_tiny_model_dir(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 1}))  # weights never read
    with pytest.raises(InvalidParams, match="num_key_value_heads") as err:
        LLM(str(tmp_path), tensor_parallel_size=2, **OPTIONS)
    assert err.value.field == "tensor_parallel_size"
    assert not rank_processes(os.getpid())


def test_a_failed_construction_leaves_no_rank(model_dir: Path) -> None:
    from lmport.engine.errors import OutOfKVCache

    with pytest.raises(OutOfKVCache):  # raised on rank 0 after the other rank started
        LLM(str(model_dir), tensor_parallel_size=2, **{**OPTIONS, "kv_cache_memory_bytes": 1024})
    assert not rank_processes(os.getpid())  # killed and reaped before the error reached here


def test_other_families_and_lora_are_refused_by_name(tmp_path: Path) -> None:
    from lmport.engine.config import EngineConfig
    from lmport.engine.models.opt import OPTForCausalLM
    from lmport.engine.parallel import check_tensor_parallel

    with pytest.raises(Unsupported, match="Llama, Mistral, Qwen2") as err:
        check_tensor_parallel(OPTForCausalLM, None, 2, torch.device("cpu"))  # type: ignore[arg-type]
    assert err.value.field == "tensor_parallel_size"
    with pytest.raises(Unsupported) as err:
        EngineConfig(tensor_parallel_size=2, enable_lora=True)
    assert err.value.field == "enable_lora"
    with pytest.raises(InvalidParams) as err:
        EngineConfig(tensor_parallel_size=2, distributed_executor_backend="uni")
    assert err.value.field == "distributed_executor_backend"


@pytest.fixture()
def worker_client() -> Iterator:
    from lmport.bridge.client import Client

    with tempfile.TemporaryFile() as stderr:
        client = Client.spawn(cwd=str(REPO), stderr=stderr)
        try:
            yield client
        finally:
            client.close()


@pytest.mark.slow
def test_no_rank_outlives_the_worker_when_the_host_sigkills_it(worker_client, model_dir: Path) -> None:  # noqa: ANN001
    llm = worker_client.llm(str(model_dir), tensor_parallel_size=2, **OPTIONS)
    out = worker_client.generate(llm, "hello", {"max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert len(out[0]["outputs"][0]["token_ids"]) == 8
    ranks = rank_processes(worker_client.process.pid)
    assert len(ranks) == 1
    os.kill(worker_client.process.pid, signal.SIGKILL)
    assert none_alive(ranks, timeout=5), [p.pid for p in ranks]


def test_a_rank_that_dies_fails_the_engine_instead_of_hanging_it(model_dir: Path) -> None:
    llm = LLM(str(model_dir), tensor_parallel_size=2, **OPTIONS)
    proc = llm.engine.runner.tp.procs[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    start = time.monotonic()
    with pytest.raises(EngineDead, match="Connection closed by peer"):
        llm.generate("hi", SamplingParams(max_tokens=4), use_tqdm=False)
    llm.shutdown()
    assert time.monotonic() - start < 10
