"""One timer thread for keep_alive: it runs a sweep (the service's "unload what has been idle too long") whenever
woken and at the time the last sweep asked for, so idle engines unload on time without a thread per engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Reaper:
    def __init__(self, sweep: Callable[[], float | None], name: str = "lmport-keep-alive") -> None:
        """sweep() does the work and returns the monotonic time it next needs to run, or None (until woken)."""
        self._sweep = sweep
        self._name = name
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._woken = False
        self._closed = False

    def wake(self) -> None:
        """Sweep soon (something became idle, loaded or changed its keep_alive). The thread starts on first use,
        so a service whose engines never unload never runs one."""
        with self._cond:
            if self._closed:
                return
            self._woken = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        due: float | None = None
        while True:
            with self._cond:
                while not self._closed and not self._woken and (due is None or due > time.monotonic()):
                    self._cond.wait(None if due is None else due - time.monotonic())
                if self._closed:
                    return
                self._woken = False
            due = self._sweep()
