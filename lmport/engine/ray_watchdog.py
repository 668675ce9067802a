"""Kill the Ray processes an engine's process started once that process is gone, however it went.

Ray starts gcs_server, the raylet and its helpers as children of the process that calls ray.init, with
PR_SET_PDEATHSIG, and its workers exit when the raylet does; but the raylet's dashboard and runtime-env agents
outlive a SIGKILLed driver (Ray 2.60: they notice the raylet is gone, then hang on the way out). This process,
which lmport.engine.ray_executor starts in a session of its own, reads "pid start-time" lines from its stdin: a
pipe whose only write end the engine's process holds. At end of file (the engine closed it after ray.shutdown, or
died) it SIGKILLs every listed process still running with that start time, and their children, then exits.

`python -m lmport.engine.ray_watchdog` (psutil and the standard library only: it starts in a fraction of a second).
"""

from __future__ import annotations

import signal
import sys

import psutil

_SAME_START_S = 0.5  # a pid whose process started at another time is another process


def kill_listed(listed: dict[int, float]) -> None:
    doomed: list[psutil.Process] = []
    for pid, started in listed.items():
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - started) < _SAME_START_S:
                doomed.extend([proc, *proc.children(recursive=True)])
        except psutil.Error:
            continue
    for proc in doomed:
        try:
            proc.send_signal(signal.SIGKILL)  # psutil checks the pid still names the same process
        except psutil.Error:
            continue


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only end of file ends this process
    listed: dict[int, float] = {}
    for line in sys.stdin:
        pid, started = line.split()
        listed[int(pid)] = float(started)
    kill_listed(listed)


if __name__ == "__main__":
    main()
