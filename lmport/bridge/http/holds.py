"""Engine holds that last as long as the HTTP request (or WebSocket) that took them.

A request makes several service calls (tokenize, then generate, ...). With keep_alive the engine may unload
between two of them, so the request holds its model from admission until its response has been sent: the endpoint
registers the hold's release here, and the `ReleaseHolds` middleware, which wraps the whole ASGI call (a streamed
body included), releases it when the call returns, however it ends; a WebSocket does the same per message.
keep_alive then counts from there, as in Ollama.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from starlette.types import ASGIApp, Receive, Scope, Send

_HOLDS: ContextVar[list[Callable[[], None]] | None] = ContextVar("lmport_engine_holds", default=None)


def until_response_ends(release: Callable[[], None]) -> None:
    """Call release() once the current request's response is done (at once outside a request)."""
    holds = _HOLDS.get()
    if holds is None:
        release()
    else:
        holds.append(release)


@contextmanager
def holding() -> Iterator[None]:
    """A scope whose holds are released when it ends: an HTTP request's (ReleaseHolds), or one WebSocket message's
    (a socket serves many requests, and must not keep a model loaded between them)."""
    holds: list[Callable[[], None]] = []
    token = _HOLDS.set(holds)
    try:
        yield
    finally:
        _HOLDS.reset(token)
        for release in holds:
            release()


class ReleaseHolds:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # a WebSocket scopes each of its messages itself
            return
        with holding():
            await self.app(scope, receive, send)
