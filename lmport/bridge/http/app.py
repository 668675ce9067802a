"""The FastAPI application: middleware (body limit, CORS), error handlers, routes, and the model loading in the
background so that /health answers 503 until the engine is ready."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmport.bridge.http.config import Settings
from lmport.bridge.http.embeddings import router as embeddings_router
from lmport.bridge.http.errors import APIError, install_handlers, too_large
from lmport.bridge.http.generation import Backend
from lmport.bridge.http.holds import ReleaseHolds
from lmport.bridge.http.playground import install_playground
from lmport.bridge.http.routes import router
from lmport.bridge.http.simple import router as simple_router
from lmport.bridge.http.state import ServerState
from lmport.engine import __version__


def build_app(settings: Settings, backend: Backend | None = None) -> FastAPI:
    if backend is None:
        from lmport.bridge.http.backend import ServiceBackend  # the service imports the engine lazily; keep it that way
        backend = ServiceBackend(settings.engine, memory_budget_bytes=settings.memory_budget_bytes)
    state = ServerState(settings, backend)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.start_loading()
        yield
        await asyncio.to_thread(state.close)

    app = FastAPI(title="lmport", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API over the lmport engine")
    app.state.lmport = state
    install_handlers(app)
    serve = settings.serve
    app.add_middleware(CORSMiddleware, allow_origins=serve.allowed_origins, allow_methods=serve.allowed_methods,
                       allow_headers=serve.allowed_headers, allow_credentials=serve.allow_credentials)
    app.add_middleware(BodyLimit, max_bytes=serve.max_body_bytes)
    app.add_middleware(ReleaseHolds)  # outermost: a request's engine hold ends after its whole response
    app.include_router(router)
    app.include_router(embeddings_router)
    app.include_router(simple_router)
    install_playground(app)
    return app


class BodyLimit:
    """413 for a body over max_bytes: at once from Content-Length, or while a chunked body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._error().response()(scope, receive, send)
            return
        seen = 0
        over = False  # once over the limit, the app sees a disconnect and its answer is replaced by the 413
        started = False

        async def limited() -> Message:
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over and not started:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited, guarded_send)
        if over and not started:
            await self._error().response()(scope, receive, send)

    def _error(self) -> APIError:
        return too_large(None, f"The request body is over the server's limit of {self.max_bytes} bytes "
                               f"(--max-body-bytes).", code="request_too_large")
