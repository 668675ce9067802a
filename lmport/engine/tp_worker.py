"""The ranks 1..N-1 of a tensor-parallel engine: started by rank 0 (`launch`), each loads its shard of the model,
allocates the KV cache of its heads and runs every step's forward that rank 0 broadcasts, until told to stop.

No rank outlives the engine: a rank gets SIGKILL when the thread that started it ends (PR_SET_PDEATHSIG, so also
when the engine's process is killed), stays in that process's process group, and exits when a broadcast fails.
`python -m lmport.engine.tp_worker` is this module's entry point; nothing but `launch` should start it.
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
from pathlib import Path

import torch
import torch.distributed as dist

from lmport.engine.config import EngineConfig
from lmport.engine.parallel import LOAD_TIMEOUT_S, TensorParallelGroup, threads_per_rank

logger = logging.getLogger("lmport")

_STORE_TIMEOUT = datetime.timedelta(seconds=LOAD_TIMEOUT_S)
_JOIN_TIMEOUT_S = 120.0  # a rank's interpreter start and imports


def launch(config: EngineConfig) -> TensorParallelGroup:
    """Rank 0: start ranks 1..N-1 of `config` (the calling thread owns them, see the module doc) and join their
    process group; they load their shards meanwhile (ModelRunner waits for them, TensorParallelGroup.wait_ready)."""
    size = config.tensor_parallel_size
    store = dist.TCPStore("127.0.0.1", 0, size, True, timeout=_STORE_TIMEOUT, wait_for_workers=False)  # a free port
    store.set("config", json.dumps(config.to_dict()))
    root = str(Path(__file__).resolve().parents[2])  # so the ranks import this lmport, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(1, size):
            # stdout stays off: a bridge worker's stdout is its protocol pipe; stderr (logs, errors) is shared
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "lmport.engine.tp_worker", "--port", str(store.port), "--rank", str(rank),
                 "--world-size", str(size), "--parent", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env))
        _wait_joined(store, procs)
        torch.set_num_threads(threads_per_rank(size))  # rank 0 computes its shard too
        return TensorParallelGroup(store, 0, size, procs)
    except BaseException:
        for proc in procs:
            proc.kill()
            proc.wait()
        raise


def _wait_joined(store: dist.TCPStore, procs: list[subprocess.Popen]) -> None:
    """Wait until every rank is about to join the process group (whose own rendezvous would wait out a rank that
    died on start for the whole store timeout)."""
    deadline = time.monotonic() + _JOIN_TIMEOUT_S
    for rank, proc in enumerate(procs, 1):
        while not store.check([f"joined/{rank}"]):
            if proc.poll() is not None:
                raise RuntimeError(f"tensor-parallel rank {rank} exited (code {proc.returncode}) on start; see stderr")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel rank {rank} did not start within {_JOIN_TIMEOUT_S:.0f} s")
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the whole group: rank 0 stops us
    logging.basicConfig(level=logging.WARNING, format=f"lmport tp rank {args.rank}: %(levelname)s %(message)s")
    from lmport.engine.loader import load_model  # after the death signal is armed: these imports take seconds
    from lmport.engine.model_runner import ModelRunner

    store = dist.TCPStore("127.0.0.1", args.port, args.world_size, False, timeout=_STORE_TIMEOUT)
    try:
        config = EngineConfig.from_dict(json.loads(store.get("config")))
        torch.set_num_threads(threads_per_rank(args.world_size))
        store.set(f"joined/{args.rank}", "1")
        group = TensorParallelGroup(store, args.rank, args.world_size)
        loaded = load_model(config, group)
        num_blocks = int(store.get("num_blocks"))  # waits for rank 0 to size its cache: every rank's is alike
        runner = ModelRunner(loaded, config.replace(num_gpu_blocks_override=num_blocks))
    except Exception as exc:  # noqa: BLE001 — reported to rank 0, which raises it from the engine's construction
        store.set(f"error/{args.rank}", f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from exc
    store.set(f"ready/{args.rank}", "1")
    try:
        while (inputs := group.receive_step()) is not None:
            runner.forward(inputs)
    except RuntimeError as exc:  # rank 0 went away mid-broadcast (its sockets closed): nothing left to serve
        logger.warning("stopping: %s", str(exc).splitlines()[0])
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
