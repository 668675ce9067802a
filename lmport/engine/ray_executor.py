"""distributed_executor_backend='ray': tensor-parallel ranks 1..N-1 as Ray actors instead of local processes.

Each actor runs lmport.engine.tp_worker.run_rank, the loop an mp rank process runs, and rendezvouses with rank 0
over the same TCPStore on 127.0.0.1, so the actors are pinned to the engine's own node. Ray itself:

- RAY_ADDRESS set (other than "local"): ray.init connects to that cluster, whose processes are not the engine's to
  stop; the actors die with their owner, the engine's process.
- otherwise, unless this process had already initialised Ray: a local Ray is started (no dashboard, the machine's
  cores, workers' output kept out of this process's stdout, usage stats off).

Either way Ray is initialised by the first Ray-backed engine of this process and shut down after the last one
closes, from a thread of its own: Ray ties its processes to the thread that started them (PR_SET_PDEATHSIG), which
must outlive every engine using them. A watchdog process (lmport.engine.ray_watchdog) kills whatever of a local
Ray is left once this process is gone, SIGKILL included.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from typing import Any

import psutil
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lmport.engine.tp_worker import JOIN_TIMEOUT_S, rank_pythonpath, run_rank

_SHUTDOWN_TIMEOUT_S = 30.0


class _Rank:
    """One rank's actor: `run` blocks in run_rank until rank 0 stops it; its result is the rank's exit status."""

    def pid(self) -> int:
        return os.getpid()

    def run(self, port: int, rank: int, world_size: int) -> int:
        logging.basicConfig(level=logging.WARNING, format=f"lmport tp rank {rank}: %(levelname)s %(message)s")
        return run_rank(port, rank, world_size)


class RayRank:
    """A rank actor shaped like an mp rank's subprocess.Popen (parallel.RankProcess): its exit status is what its
    `run` call returned, or -9 once the actor died (killed, or its process crashed)."""

    def __init__(self, actor: Any, pid: int, result: ray.ObjectRef) -> None:
        self.actor, self.pid, self.result = actor, pid, result
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and ray.wait([self.result], timeout=0)[0]:
            self.returncode = self._status()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not ray.wait([self.result], timeout=timeout)[0]:
                raise subprocess.TimeoutExpired(f"tensor-parallel rank actor (pid {self.pid})", timeout or 0)
            self.returncode = self._status()
        return self.returncode

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)

    def _status(self) -> int:
        try:
            return int(ray.get(self.result))
        except ray.exceptions.RayError:
            return -9


class RayRanks:
    """Ranks 1..size-1 as actors on this node, joining the store at `port`; Ray is held until close."""

    def __init__(self, port: int, size: int) -> None:
        self.ranks: list[RayRank] = []
        self.closed = False
        actors: list[Any] = []
        _runtime.acquire()
        try:
            node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            actor_cls = ray.remote(num_cpus=0, max_restarts=0, scheduling_strategy=node,
                                   runtime_env={"env_vars": {"PYTHONPATH": rank_pythonpath()}})(_Rank)
            actors.extend(actor_cls.remote() for _ in range(1, size))
            pids = ray.get([a.pid.remote() for a in actors], timeout=JOIN_TIMEOUT_S)
            self.ranks = [RayRank(a, pid, a.run.remote(port, rank, size))
                          for rank, (a, pid) in enumerate(zip(actors, pids), 1)]
            _runtime.watch()  # the actors' processes, and the agents the raylet has started meanwhile
        except BaseException:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            self.close()
            raise

    def close(self) -> None:
        """Kill the actors (a stopped rank's actor idles) and let go of Ray: shut down after the last engine."""
        if self.closed:
            return
        self.closed = True
        try:
            for rank in self.ranks:
                rank.kill()
        finally:
            _runtime.release()


class _Runtime:
    """This process's Ray, shared by its Ray-backed engines; initialised and shut down on a thread of its own."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.thread: threading.Thread | None = None  # runs ray.init, waits for stop, runs ray.shutdown
        self.stop = threading.Event()
        self.watchdog: subprocess.Popen | None = None  # a local Ray's, see the module doc

    def acquire(self) -> None:
        with self.lock:
            if self.users == 0 and self.thread is None and not ray.is_initialized():
                self._start()
            self.users += 1

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0 and self.thread is not None:
                self._stop()

    def watch(self) -> None:
        """Tell the watchdog (a local Ray's) every process of that Ray as it stands now."""
        with self.lock:
            self._watch()

    def _start(self) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray's usage reports would leave the machine
        address = os.environ.get("RAY_ADDRESS")
        if address and address != "local":
            options: dict[str, Any] = {"address": address}
        else:
            # Ray turns a loopback node address into the machine's own (services.resolve_ip_for_localhost), and its
            # servers listen on every interface, behind its token authentication (on by default in Ray 2.60)
            options = {"address": "local", "num_cpus": len(os.sched_getaffinity(0)), "include_dashboard": False}
            # a session of its own, so it outlives a kill of this process's group and cleans up after it
            self.watchdog = subprocess.Popen([sys.executable, "-m", "lmport.engine.ray_watchdog"],
                                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                             start_new_session=True, env={**os.environ, "PYTHONPATH": rank_pythonpath()})
        started = threading.Event()
        failed: list[BaseException] = []

        def own() -> None:
            try:
                ray.init(log_to_driver=False, logging_level=logging.ERROR, **options)
            except BaseException as exc:  # noqa: BLE001 — raised from _start
                failed.append(exc)
                return
            finally:
                started.set()
            self.stop.wait()
            ray.shutdown()

        self.stop.clear()
        self.thread = threading.Thread(target=own, name="lmport-ray", daemon=True)
        self.thread.start()
        started.wait()
        if failed:
            self._stop()
            raise failed[0]
        self._watch()

    def _stop(self) -> None:
        self.stop.set()
        self.thread.join(_SHUTDOWN_TIMEOUT_S)  # type: ignore[union-attr]
        self.thread = None
        if self.watchdog is not None:  # the end of its stdin: it kills what ray.shutdown left, then exits
            self.watchdog.stdin.close()  # type: ignore[union-attr]
            self.watchdog.wait(_SHUTDOWN_TIMEOUT_S)
            self.watchdog = None

    def _watch(self) -> None:
        if self.watchdog is None:
            return
        lines = []
        for proc in _ray_processes():
            try:
                lines.append(f"{proc.pid} {proc.create_time()!r}\n")
            except psutil.Error:
                continue
        self.watchdog.stdin.write("".join(lines).encode())  # type: ignore[union-attr]
        self.watchdog.stdin.flush()  # type: ignore[union-attr]


def _ray_processes() -> list[psutil.Process]:
    """The processes of the Ray this process started (Ray's own record of them, an internal of Ray 2.x) and their
    descendants: the raylet's agents and workers."""
    node = ray._private.worker._global_node  # noqa: SLF001
    found = []
    for infos in node.all_processes.values() if node is not None else []:
        for info in infos:
            try:
                proc = psutil.Process(info.process.pid)
                found.extend([proc, *proc.children(recursive=True)])
            except psutil.Error:
                continue
    return found


_runtime = _Runtime()
