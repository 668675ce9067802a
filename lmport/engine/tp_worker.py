"""The ranks 1..N-1 of a tensor-parallel engine: started by rank 0 (`launch`), each loads its shard of the model,
allocates the KV cache of its heads and runs every step's forward that rank 0 broadcasts, until told to stop.

The `mp` executor (the default) runs each rank as a process, `python -m lmport.engine.tp_worker` (this module's entry
point; nothing but `launch` should start it); distributed_executor_backend='ray' runs them as Ray actors
(lmport.engine.ray_executor). Either way a rank runs `run_rank` and rendezvouses with rank 0 over the same TCPStore.

No rank outlives the engine: a rank process gets SIGKILL when the thread that started it ends (PR_SET_PDEATHSIG, so
also when the engine's process is killed), stays in that process's process group, and exits when a broadcast fails.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from lmport.engine.config import EngineConfig
from lmport.engine.errors import Unsupported
from lmport.engine.parallel import LOAD_TIMEOUT_S, RankProcess, TensorParallelGroup, threads_per_rank

logger = logging.getLogger("lmport")

_STORE_TIMEOUT = datetime.timedelta(seconds=LOAD_TIMEOUT_S)
JOIN_TIMEOUT_S = 120.0  # a rank's interpreter start and imports


def launch(config: EngineConfig) -> TensorParallelGroup:
    """Rank 0: start ranks 1..N-1 of `config` (the calling thread owns them, see the module doc) and join their
    process group; they load their shards meanwhile (ModelRunner waits for them, TensorParallelGroup.wait_ready)."""
    size = config.tensor_parallel_size
    store = dist.TCPStore("127.0.0.1", 0, size, True, timeout=_STORE_TIMEOUT, wait_for_workers=False)  # a free port
    store.set("config", json.dumps(config.to_dict()))
    procs: list[RankProcess] = []
    on_close: Callable[[], None] | None = None
    try:
        if config.distributed_executor_backend == "ray":
            try:
                from lmport.engine.ray_executor import RayRanks
            except ModuleNotFoundError as exc:
                if exc.name != "ray":
                    raise
                raise Unsupported("distributed_executor_backend", "'ray' needs Ray installed: pip install "
                                  "'lmport[ray]' (or use 'mp')") from exc
            ray_ranks = RayRanks(store.port, size)  # cleans up after itself when it fails
            procs, on_close = ray_ranks.ranks, ray_ranks.close
        else:
            _start_processes(store.port, size, procs)
        _wait_joined(store, procs)
        torch.set_num_threads(threads_per_rank(size))  # rank 0 computes its shard too
        return TensorParallelGroup(store, 0, size, procs, on_close)
    except BaseException:
        for proc in procs:
            proc.kill()
            proc.wait()
        if on_close is not None:
            on_close()
        raise


def _start_processes(port: int, size: int, procs: list[RankProcess]) -> None:
    """The mp executor: ranks 1..size-1 as `python -m lmport.engine.tp_worker` processes, appended as they start."""
    env = {**os.environ, "PYTHONPATH": rank_pythonpath()}
    for rank in range(1, size):
        # stdout stays off: a bridge worker's stdout is its protocol pipe; stderr (logs, errors) is shared
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "lmport.engine.tp_worker", "--port", str(port), "--rank", str(rank),
             "--world-size", str(size), "--parent", str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env))


def rank_pythonpath() -> str:
    """A rank's PYTHONPATH: this lmport's checkout first, so the ranks import this lmport, installed or not."""
    return os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]))


def _wait_joined(store: dist.TCPStore, procs: list[RankProcess]) -> None:
    """Wait until every rank is about to join the process group (whose own rendezvous would wait out a rank that
    died on start for the whole store timeout)."""
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for rank, proc in enumerate(procs, 1):
        while not store.check([f"joined/{rank}"]):
            if proc.poll() is not None:
                raise RuntimeError(f"tensor-parallel rank {rank} exited (code {proc.returncode}) on start; see stderr")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel rank {rank} did not start within {JOIN_TIMEOUT_S:.0f} s")
            time.sleep(0.01)


def _die_with_parent(parent: int) -> None:
    """Get SIGKILL when the starting thread of `parent` ends: PR_SET_PDEATHSIG on Linux, a polling thread elsewhere.
    A parent that died before this ran is caught by the getppid check."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    else:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)
        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:
        os._exit(1)


def run_rank(port: int, rank: int, world_size: int) -> int:
    """One rank, whichever executor started it: join rank 0's store, load this rank's shard, then run every step
    rank 0 broadcasts until it says stop. Returns the exit status: 0 when asked to stop, 1 when loading failed (the
    error is in the store, for rank 0 to raise) or rank 0 went away."""
    from lmport.engine.loader import load_model  # these imports take seconds
    from lmport.engine.model_runner import ModelRunner

    store = dist.TCPStore("127.0.0.1", port, world_size, False, timeout=_STORE_TIMEOUT)
    try:
        config = EngineConfig.from_dict(json.loads(store.get("config")))
        torch.set_num_threads(threads_per_rank(world_size))
        store.set(f"joined/{rank}", "1")
        group = TensorParallelGroup(store, rank, world_size)
        loaded = load_model(config, group)
        num_blocks = int(store.get("num_blocks"))  # waits for rank 0 to size its cache: every rank's is alike
        runner = ModelRunner(loaded, config.replace(num_gpu_blocks_override=num_blocks))
    except Exception as exc:  # noqa: BLE001 — reported to rank 0, which raises it from the engine's construction
        store.set(f"error/{rank}", f"{type(exc).__name__}: {exc}")
        return 1
    store.set(f"ready/{rank}", "1")
    try:
        while (inputs := group.receive_step()) is not None:
            runner.forward(inputs)
    except RuntimeError as exc:  # rank 0 went away mid-broadcast (its sockets closed): nothing left to serve
        logger.warning("stopping: %s", str(exc).splitlines()[0])
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)  # before run_rank's imports, which take seconds
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the whole group: rank 0 stops us
    logging.basicConfig(level=logging.WARNING, format=f"lmport tp rank {args.rank}: %(levelname)s %(message)s")
    raise SystemExit(run_rank(args.port, args.rank, args.world_size))


if __name__ == "__main__":
    main()
