"""A worker process driven over raw pipes (bytes in, decoded frames out) for the bridge tests."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from lmport.bridge import protocol
from lmport.bridge.results import split_union

REPO = Path(__file__).resolve().parent.parent


def spawn_shim() -> Iterator[Any]:
    """A Python-shim Client on a real worker (stderr kept in a temporary file), closed afterwards: for fixtures."""
    from lmport.bridge.client import Client

    with tempfile.TemporaryFile() as stderr:
        client = Client.spawn(cwd=str(REPO), stderr=stderr)
        yield client
        client.close()


class RawWorker:
    def __init__(self, *args: str, hello_timeout: float = 30.0, stdin: Any = subprocess.PIPE) -> None:
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "lmport.bridge.worker", *args], stdin=stdin,
                                     stdout=subprocess.PIPE, stderr=self.stderr, cwd=REPO)
        self.decoder = protocol.FrameDecoder()
        self.inbox: deque[dict[str, Any]] = deque()
        self.stash: list[dict[str, Any]] = []  # responses read while waiting for something else
        self.hello = self.next(hello_timeout)
        assert self.hello["type"] == "hello", self.hello

    def send(self, data: bytes | dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data if isinstance(data, bytes) else protocol.pack(data))
        self.proc.stdin.flush()

    def request(self, request_id: int | str, method: str, params: dict[str, Any] | None = None, **options: Any) -> None:
        self.send(protocol.request(request_id, method, params, **options))

    def next(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next frame from the worker, decoded (fails the test on timeout or EOF)."""
        end = time.monotonic() + timeout
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while not self.inbox:
            remaining = end - time.monotonic()
            assert remaining > 0, "no frame from the worker in time"
            if not select.select([fd], [], [], remaining)[0]:
                continue
            data = os.read(fd, 1 << 20)
            assert data, "the worker closed stdout"
            for payload in self.decoder.feed(data):
                self.inbox.append(protocol.unpack(payload))  # any corruption fails here
        return self.inbox.popleft()

    def until(self, predicate: Any, timeout: float = 10.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Read until a frame matches; returns it and the frames read before it (responses among them are also
        kept for a later response() call)."""
        skipped = []
        end = time.monotonic() + timeout
        while True:
            message = self.next(max(0.01, end - time.monotonic()))
            if predicate(message):
                return message, skipped
            skipped.append(message)
            if message["type"] == "response":
                self.stash.append(message)

    def response(self, request_id: int | str, timeout: float = 10.0) -> dict[str, Any]:
        for message in self.stash:
            if message["id"] == request_id:
                self.stash.remove(message)
                return message
        return self.until(lambda m: m["type"] == "response" and m["id"] == request_id, timeout)[0]

    def call(self, request_id: int | str, method: str, params: dict[str, Any] | None = None,
             timeout: float = 10.0, **options: Any) -> dict[str, Any]:
        self.request(request_id, method, params, **options)
        return self.response(request_id, timeout)

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def group_alive(pgid: int) -> bool:
    """Is any live (non-zombie) process left in the process group?"""
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def conforms(value: object, expr: str, schema: dict[str, list[dict[str, object]]], path: str = "result") -> str | None:
    """None when value has exactly the shape expr names, else where and how it differs (the drift check)."""
    problems = []
    for alternative in split_union(expr):
        problem = _conforms_one(value, alternative, schema, path)
        if problem is None:
            return None
        problems.append(problem)
    return problems[0] if len(problems) == 1 else f"{path}: {value!r:.80} fits none of {expr}"


def _conforms_one(value: object, expr: str, schema: dict[str, list[dict[str, object]]], path: str) -> str | None:
    if expr.startswith("list[") and expr.endswith("]"):
        if not isinstance(value, list):
            return f"{path}: expected a list, got {type(value).__name__}"
        return next((p for i, v in enumerate(value) if (p := conforms(v, expr[5:-1], schema, f"{path}[{i}]"))),
                    None)
    if expr in schema:
        if not isinstance(value, dict):
            return f"{path}: expected a {expr} map, got {type(value).__name__}"
        fields = {f["name"]: f for f in schema[expr]}
        extra = sorted(set(value) - set(fields))
        missing = sorted(n for n, f in fields.items() if f["required"] and n not in value)
        if extra or missing:
            return f"{path} ({expr}): unexpected keys {extra}, missing keys {missing}"
        return next((p for n, v in value.items() if (p := conforms(v, str(fields[n]["type"]), schema, f"{path}.{n}"))),
                    None)
    python_type = {"str": str, "int": int, "float": float, "bool": bool, "null": type(None)}[expr]
    ok = isinstance(value, python_type) and (expr in ("bool", "null") or not isinstance(value, bool))
    return None if ok else f"{path}: expected {expr}, got {type(value).__name__} {value!r:.40}"
