"""Preloaded into a worker (--preload tests.bridge_noise): writes junk to fd 1 from Python and from C, at import
and then continuously from a thread, to prove the frame stream is protected at the file-descriptor level."""

from __future__ import annotations

import ctypes
import os
import threading
import time

_libc = ctypes.CDLL(None)


def _noise() -> None:
    print("noise: python print to stdout")
    os.write(1, b"noise: os.write(1)\n")
    _libc.write(1, b"noise: libc write(1)\n", 21)


def _loop() -> None:
    while True:
        _noise()
        time.sleep(0.005)


_noise()
threading.Thread(target=_loop, daemon=True).start()
