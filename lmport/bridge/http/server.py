"""`lmport serve`: the OpenAI-compatible HTTP server (FastAPI on uvicorn) over the bridge service."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING

from lmport.bridge.http import config

if TYPE_CHECKING:
    from lmport.bridge.http.generation import Backend

logger = logging.getLogger("lmport.http")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from lmport.bridge.http.app import build_app
    from lmport.engine.errors import InvalidParams

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "module", "log_level")}
    try:
        settings = config.load_settings(flags)
    except InvalidParams as exc:
        print(f"lmport serve: {exc}", file=sys.stderr)
        return 2
    serve = settings.serve
    try:
        sock = listen(serve.host, serve.port)
    except OSError as exc:
        print(f"lmport serve: cannot listen on {serve.host}:{serve.port}: {exc}", file=sys.stderr)
        return 1
    # the bound port: with --port 0 this line is how a caller (a test, a supervisor) learns it
    logger.info("serving %s as %s on http://%s:%d", settings.models, settings.model_names, serve.host,
                sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(build_app(settings), log_level=serve.uvicorn_log_level,
                                           access_log=serve.access_log, timeout_graceful_shutdown=5))
    # uvicorn raises the signal that stopped it again once it has shut down; SIGTERM (what Docker and Kubernetes
    # send) then ends the process as SIGINT does, exit 0 after the orderly shutdown rather than killed by the signal
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the SIGINT it caught again once it has shut down
        pass
    finally:
        sock.close()
    return 0 if server.started else 1


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: the OS picks a free one). Listening before uvicorn starts means a client that
    connects meanwhile waits in the backlog rather than being refused."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class RunningServer:
    """A server on a background thread (tests, benchmarks, embedding in a Python program)."""

    def __init__(self, settings: config.Settings, backend: Backend | None = None) -> None:
        import uvicorn

        from lmport.bridge.http.app import build_app

        serve = settings.serve
        self._socket = listen(serve.host, serve.port)
        self.port = self._socket.getsockname()[1]
        self.url = f"http://{serve.host}:{self.port}"
        self.app = build_app(settings, backend)
        self.state = self.app.state.lmport
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level=serve.uvicorn_log_level,
                                                     access_log=serve.access_log, timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="lmport-http", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float = 300.0) -> RunningServer:
        """Block until the server accepts connections and the model is loaded (raises if loading failed)."""
        end = time.monotonic() + timeout
        while not (self.state.ready and self._server.started):
            if self.state.load_error:
                raise RuntimeError(self.state.load_error)
            if not self._thread.is_alive():
                raise RuntimeError("the HTTP server stopped before it was ready")
            if time.monotonic() > end:
                raise TimeoutError(f"the model did not load within {timeout} s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()
