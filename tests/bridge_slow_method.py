"""Preloaded into a worker (--preload tests.bridge_slow_method): adds a `sleep` method through the same @rpc
registry as the built-in ones, giving the tests a request that stays in flight without loading a model."""

from __future__ import annotations

import time

from lmport.bridge.service import rpc


@rpc()
def sleep(self, seconds: float) -> dict:
    """Sleep, then answer (a request that stays in flight).

    Args:
        seconds: how long to sleep.
    Returns:
        {slept}.
    """
    time.sleep(seconds)
    return {"slept": seconds}


@rpc()
def fail(self, message: str) -> dict:
    """Raise an unexpected exception (an `internal` error).

    Args:
        message: the exception's message.
    Returns:
        Never returns.
    """
    raise RuntimeError(message)
