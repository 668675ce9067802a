"""The Python shim: start an lmport worker and call it, synchronously or from asyncio.

    from lmport.bridge.client import Client
    with Client.spawn() as client:
        llm = client.llm("smollm2", dtype="float32")
        print(client.generate(llm, "The capital of France is", {"max_tokens": 8})[0]["outputs"][0]["text"])
        for chunk in client.generate(llm, ["Hi"], {"max_tokens": 8}, stream=True):
            print(chunk["outputs"][0]["text"], end="")

    async with await AsyncClient.spawn() as client:
        llm = await client.llm()
        async for chunk in client.chat(llm, [{"role": "user", "content": "Hi"}], stream=True): ...

Every call takes `timeout` (seconds) and `timeout_profile`; the worker enforces the deadline (aborting the engine
work), and the client holds its own deadline (plus `deadline_grace`) for a wedged worker: on expiry it cancels the
request, raises deadline_exceeded (details.client_side), and kills the worker if it no longer answers ping.
One reader thread serves both faces; results are plain data (dicts, lists, str).
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from lmport.bridge import protocol
from lmport.bridge.protocol import BridgeError
from lmport.bridge.service import METHODS

logger = logging.getLogger("lmport.client")
Handle = dict[str, Any] | str


class _Transport:
    """The worker process, its pipes, and the request multiplexer (a reader thread routes frames by id)."""

    def __init__(self, process: subprocess.Popen[bytes], on_event: Callable[[str, Any], None] | None,
                 deadline_grace: float) -> None:
        self.process = process
        self.on_event = on_event
        self.deadline_grace = deadline_grace
        self.hello: dict[str, Any] = {}
        self._hello_ready = threading.Event()
        self._pending: dict[int, Callable[[tuple[str, Any]], None]] = {}  # id -> inbox.put: chunks, then "done"
        self._ids = itertools.count(1)
        self._next_seq: dict[int, int] = {}  # streaming requests: the chunk seq expected next
        self._write_lock = threading.Lock()
        self._exited: BridgeError | None = None
        threading.Thread(target=self._read_loop, name="lmport-client-reader", daemon=True).start()

    def wait_hello(self, timeout: float) -> None:
        if not self._hello_ready.wait(timeout):
            self.kill()
            raise BridgeError("spawn_failed", f"the worker sent no hello within {timeout} s")
        if self._exited is not None and not self.hello:
            raise BridgeError("spawn_failed", f"the worker exited before its hello: {self._exited.message}",
                              details=self._exited.details)
        if self.hello.get("protocol") != protocol.PROTOCOL_VERSION:
            self.kill()
            raise BridgeError("protocol_mismatch", f"the worker speaks protocol {self.hello.get('protocol')!r}; "
                                                   f"this client speaks {protocol.PROTOCOL_VERSION}")

    def start(self, method: str, params: dict[str, Any], put: Callable[[tuple[str, Any]], None], *,
              stream: bool = False, timeout: float | None = None,
              timeout_profile: str | None = None) -> tuple[int, float]:
        """Send a request; returns its id and the client-side deadline (monotonic)."""
        if self._exited is not None:
            raise self._exited
        request_id = next(self._ids)
        timeout_ms = None if timeout is None else max(1, int(timeout * 1000))
        profile = timeout_profile or ("streaming" if stream else
                                      METHODS[method].timeout_profile if method in METHODS else "default")
        budget_ms = timeout_ms if timeout_ms is not None else self.hello["timeout_profiles"].get(profile, 120_000)
        deadline = time.monotonic() + budget_ms / 1000 + self.deadline_grace
        self._pending[request_id] = put
        try:
            self._write(protocol.request(request_id, method, params, timeout_ms=timeout_ms,
                                         timeout_profile=timeout_profile, stream=stream))
        except BaseException:
            self._pending.pop(request_id, None)
            raise
        return request_id, deadline

    def cancel(self, request_id: int, forget: bool = True) -> None:
        """Send cancel; with forget, stop listening (the cancelled response is dropped)."""
        known = (self._pending.pop(request_id, None) if forget else self._pending.get(request_id)) is not None
        if known and self._exited is None:
            try:
                self._write(protocol.cancel(request_id))
            except BridgeError:
                pass

    def expire(self, request_id: int, method: str) -> BridgeError:
        """The client-side deadline passed: cancel, and kill the worker if it no longer answers ping."""
        self.cancel(request_id)
        if not self.alive(timeout=min(5.0, self.deadline_grace)):
            logger.error("the worker does not answer ping; killing its process group")
            self.kill()
        return BridgeError("deadline_exceeded", f"no answer to {method!r} within the client-side deadline",
                           {"client_side": True})

    def alive(self, timeout: float) -> bool:
        inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        try:
            request_id, _ = self.start("ping", {}, inbox.put, timeout=timeout)
        except BridgeError:
            return False
        try:
            return inbox.get(timeout=timeout)[1].get("ok", False)
        except queue.Empty:
            self._pending.pop(request_id, None)
            return False

    def _write(self, message: dict[str, Any]) -> None:
        frame = protocol.pack(message)
        with self._write_lock:
            try:
                self.process.stdin.write(frame)  # type: ignore[union-attr]
                self.process.stdin.flush()  # type: ignore[union-attr]
            except (BrokenPipeError, ValueError, OSError):
                raise self._exited or BridgeError("worker_exited", "the worker's stdin is closed") from None

    def _read_loop(self) -> None:
        decoder = protocol.FrameDecoder()
        stdout = self.process.stdout
        assert stdout is not None
        while True:
            data = stdout.read1(1 << 20)
            if not data:
                break
            for payload in decoder.feed(data):
                try:
                    message = protocol.unpack(payload)  # type: ignore[arg-type]
                except BridgeError as exc:
                    # Past an undecodable frame the stream cannot be trusted (docs/protocol.md; the Node client
                    # does the same): every pending call fails with protocol_error and the worker is killed.
                    self._fail_all(BridgeError("protocol_error", f"unreadable frame from the worker: {exc.message}"))
                    self.kill()
                    return
                try:
                    self._route(message)
                except Exception:  # noqa: BLE001 — a frame we cannot act on (or an on_event that raised) is logged
                    logger.exception("lmport client: bad frame from the worker")
        code = self.process.wait()
        self._fail_all(BridgeError("worker_exited", f"the worker exited with code {code}"))

    def _fail_all(self, error: BridgeError) -> None:
        """The worker is gone (or abandoned): pending calls and later ones fail with the first such error."""
        if self._exited is None:
            self._exited = error
        self._hello_ready.set()
        pending, self._pending = self._pending, {}
        for put in pending.values():
            put(("done", {"ok": False, "error": self._exited.to_wire()}))

    def _route(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "hello":
            self.hello = message
            self._hello_ready.set()
        elif kind == "response":
            self._next_seq.pop(message.get("id"), None)  # type: ignore[arg-type]
            put = self._pending.pop(message.get("id"), None)  # type: ignore[arg-type]
            if put is not None:
                put(("done", message))
        elif kind == "chunk":
            request_id = message.get("id")
            put = self._pending.get(request_id)  # type: ignore[arg-type]
            if put is None:
                return
            expected = self._next_seq.get(request_id, 0)  # type: ignore[arg-type]
            if message.get("seq") != expected:
                error = BridgeError("protocol_error", f"chunk seq {message.get('seq')} of request {request_id} arrived "
                                                f"where {expected} was expected")
                self.cancel(request_id)  # type: ignore[arg-type]
                put(("done", {"ok": False, "error": error.to_wire()}))
                return
            self._next_seq[request_id] = expected + 1  # type: ignore[index]
            put(("chunk", message.get("data")))
        elif kind == "event":
            if message.get("name") == "protocol_error":
                logger.warning("lmport worker reported a protocol error: %s", message.get("data"))
            if self.on_event is not None:
                self.on_event(message.get("name", ""), message.get("data"))

    def kill(self, wait: float = 2.0) -> None:
        """TERM, then KILL, the worker's whole process group (only the worker if it shares ours)."""
        pgid = self.hello.get("pgid")
        own_group = not pgid or pgid == os.getpgrp()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                if own_group:
                    self.process.send_signal(sig)
                else:
                    os.killpg(pgid, sig)
            except ProcessLookupError:
                return  # nothing of the group is left
            try:
                self.process.wait(wait)
            except subprocess.TimeoutExpired:
                pass

    def close(self, grace: float) -> int | None:
        """shutdown -> close stdin -> wait grace -> kill the group (TERM, then KILL)."""
        if self.process.poll() is None and self._exited is None:
            inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
            try:
                self.start("shutdown", {}, inbox.put, timeout=grace)
                inbox.get(timeout=grace + self.deadline_grace)
            except (queue.Empty, BridgeError):
                pass
        try:
            self.process.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        self.kill()
        return self.process.poll()


def _result(message: dict[str, Any]) -> Any:
    if message.get("ok"):
        return message.get("result")
    raise BridgeError.from_wire(message.get("error"))


def _spawn_process(worker_args: tuple[str, ...], python: str | None, env: dict[str, str] | None,
                   cwd: str | None, stderr: Any) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen([python or sys.executable, "-m", "lmport.bridge.worker", *worker_args],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=cwd)
    except OSError as exc:  # no such interpreter, not executable, bad cwd
        raise BridgeError("spawn_failed", f"cannot start the worker: {exc}") from exc


def _params(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


class _Methods(abc.ABC):
    """The RPC methods, shared by both faces: _invoke returns a value (Client) or an awaitable (AsyncClient)."""

    def __init__(self, transport: _Transport, grace: float) -> None:
        self._transport = transport
        self.grace = grace

    @property
    def hello(self) -> dict[str, Any]:
        return self._transport.hello

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self._transport.process

    def call(self, method: str, params: dict[str, Any] | None = None, *, timeout: float | None = None,
             timeout_profile: str | None = None) -> Any:
        return self._invoke(method, params or {}, timeout=timeout, timeout_profile=timeout_profile)

    @abc.abstractmethod
    def _invoke(self, method: str, params: dict[str, Any], *, stream: bool = False, timeout: float | None = None,
                timeout_profile: str | None = None) -> Any:
        """Send one request: Client returns its result, AsyncClient an awaitable of it."""

    def describe(self, *, timeout: float | None = None) -> Any:
        return self._invoke("describe", {}, timeout=timeout)

    def llm(self, model: str = "smollm2", *, timeout: float | None = None, timeout_profile: str | None = None,
            **options: Any) -> Any:
        """Load (or reuse) an engine; options are engine options (dtype, max_model_len, ...)."""
        return self._invoke("llm", {"model": model, **options}, timeout=timeout, timeout_profile=timeout_profile)

    def sampling_params(self, *, timeout: float | None = None, **fields: Any) -> Any:
        return self._invoke("sampling_params", fields, timeout=timeout)

    def generate(self, llm: Handle, prompts: Any, sampling_params: dict[str, Any] | list[dict[str, Any]] | None
                 = None, *, lora_request: dict[str, Any] | list[dict[str, Any] | None] | None = None,
                 stream: bool = False, timeout: float | None = None, timeout_profile: str | None = None) -> Any:
        """RequestOutput maps, one per prompt; with stream=True an iterator of delta chunks (see docs).
        lora_request: {lora_name, lora_int_id, lora_path} for every prompt, or one (or None) each."""
        return self._invoke("generate", _params(llm=llm, prompts=prompts, sampling_params=sampling_params,
                                                lora_request=lora_request),
                            stream=stream, timeout=timeout, timeout_profile=timeout_profile)

    def chat(self, llm: Handle, messages: list[Any], sampling_params: dict[str, Any] | list[dict[str, Any]] | None
             = None, *, chat_template: str | None = None, add_generation_prompt: bool = True,
             tools: list[dict[str, Any]] | None = None, tool_choice: str | dict[str, Any] | None = None,
             lora_request: dict[str, Any] | list[dict[str, Any] | None] | None = None,
             stream: bool = False, timeout: float | None = None, timeout_profile: str | None = None) -> Any:
        """RequestOutput maps, one per conversation; with tools, each completion's calls are in its tool_calls."""
        return self._invoke("chat", _params(llm=llm, messages=messages, sampling_params=sampling_params,
                                            chat_template=chat_template,
                                            add_generation_prompt=add_generation_prompt, tools=tools,
                                            tool_choice=tool_choice, lora_request=lora_request),
                            stream=stream, timeout=timeout, timeout_profile=timeout_profile)

    def embed(self, llm: Handle, input: Any, *, pooling: str = "mean", normalize: bool = True,
              dimensions: int | None = None, timeout: float | None = None,
              timeout_profile: str | None = None) -> Any:
        """An EmbedResult map: {data: [{index, embedding, prompt_tokens}], usage: {prompt_tokens, total_tokens}}."""
        return self._invoke("embed", _params(llm=llm, input=input, pooling=pooling, normalize=normalize,
                                             dimensions=dimensions), timeout=timeout, timeout_profile=timeout_profile)

    def tokenize(self, llm: Handle, text: str, add_special_tokens: bool = True, *,
                 timeout: float | None = None) -> Any:
        return self._invoke("tokenize", {"llm": llm, "text": text, "add_special_tokens": add_special_tokens},
                            timeout=timeout)

    def detokenize(self, llm: Handle, token_ids: list[int], skip_special_tokens: bool = False, *,
                   timeout: float | None = None) -> Any:
        return self._invoke("detokenize", {"llm": llm, "token_ids": token_ids,
                                           "skip_special_tokens": skip_special_tokens}, timeout=timeout)

    def release(self, ref: Handle, *, timeout: float | None = None) -> Any:
        return self._invoke("release", {"ref": ref}, timeout=timeout)

    def ping(self, n: int = 0, *, timeout: float | None = None) -> Any:
        return self._invoke("ping", {"n": n}, timeout=timeout)

    def health(self, *, timeout: float | None = None) -> Any:
        return self._invoke("health", {}, timeout=timeout)

    def stats(self, llm: Handle | None = None, *, timeout: float | None = None) -> Any:
        return self._invoke("stats", _params(llm=llm), timeout=timeout)


class Client(_Methods):
    """Synchronous client; thread-safe (many threads may call at once — that is how requests get batched)."""

    @classmethod
    def spawn(cls, *worker_args: str, python: str | None = None, env: dict[str, str] | None = None,
              cwd: str | None = None, stderr: Any = None, startup_timeout: float = 60.0, grace: float = 5.0,
              deadline_grace: float = 5.0, on_event: Callable[[str, Any], None] | None = None) -> Client:
        """Start `python -m lmport.bridge.worker *worker_args` and wait for its hello."""
        transport = _Transport(_spawn_process(worker_args, python, env, cwd, stderr), on_event, deadline_grace)
        transport.wait_hello(startup_timeout)
        return cls(transport, grace)

    def _invoke(self, method: str, params: dict[str, Any], *, stream: bool = False, timeout: float | None = None,
                timeout_profile: str | None = None) -> Any:
        inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        request_id, deadline = self._transport.start(method, params, inbox.put, stream=stream, timeout=timeout,
                                                     timeout_profile=timeout_profile)
        result = Stream(self._transport, request_id, deadline, method, inbox)
        if stream:
            return result
        for _ in result:  # a non-streaming call has no chunks; this waits for the response
            pass
        return result.summary

    def close(self) -> int | None:
        """shutdown -> grace -> kill the process group; returns the worker's exit code."""
        return self._transport.close(self.grace)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Stream:
    """Iterator over a streaming call's chunk data; `summary` holds the final response's result afterwards.
    close() (or leaving a `with` block early) cancels the request in the worker."""

    def __init__(self, transport: _Transport, request_id: int, deadline: float, method: str,
                 inbox: queue.SimpleQueue[tuple[str, Any]]) -> None:
        self.request_id = request_id
        self._deadline = deadline
        self.summary: Any = None
        self._transport = transport
        self._method = method
        self._inbox = inbox
        self._finished = False

    def __iter__(self) -> Iterator[Any]:
        try:
            while not self._finished:
                try:
                    kind, item = self._inbox.get(timeout=max(0.0, self._deadline - time.monotonic()))
                except queue.Empty:
                    self._finished = True
                    raise self._transport.expire(self.request_id, self._method) from None
                if kind == "chunk":
                    yield item
                    continue
                self._finished = True
                self.summary = _result(item)
        finally:
            self.close()  # a consumer that breaks out of its loop cancels the request; no-op when finished

    def cancel(self) -> None:
        """Ask the worker to cancel; iterating on ends with BridgeError('cancelled', details={'usage': ...})."""
        self._transport.cancel(self.request_id, forget=False)

    def close(self) -> None:
        """Cancel (if unfinished) and stop listening."""
        if not self._finished:
            self._finished = True
            self._transport.cancel(self.request_id)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Methods):
    """asyncio face over the same transport; cancelling an awaiting task cancels its request in the worker."""

    @classmethod
    async def spawn(cls, *worker_args: str, python: str | None = None, env: dict[str, str] | None = None,
                    cwd: str | None = None, stderr: Any = None, startup_timeout: float = 60.0, grace: float = 5.0,
                    deadline_grace: float = 5.0, on_event: Callable[[str, Any], None] | None = None) -> AsyncClient:
        loop = asyncio.get_running_loop()
        transport = _Transport(_spawn_process(worker_args, python, env, cwd, stderr), on_event, deadline_grace)
        await loop.run_in_executor(None, transport.wait_hello, startup_timeout)
        return cls(transport, grace)

    def _invoke(self, method: str, params: dict[str, Any], *, stream: bool = False, timeout: float | None = None,
                timeout_profile: str | None = None) -> Any:
        result = AsyncStream(self._transport, method, params, stream, timeout, timeout_profile)
        return result if stream else result.result()

    async def close(self) -> int | None:
        return await asyncio.get_running_loop().run_in_executor(None, self._transport.close, self.grace)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncStream:
    """Async iterator over chunk data (`summary` afterwards); leaving the loop early cancels the request."""

    def __init__(self, transport: _Transport, method: str, params: dict[str, Any], stream: bool,
                 timeout: float | None, timeout_profile: str | None) -> None:
        self.summary: Any = None
        self._transport = transport
        self._method = method
        self._start = (params, stream, timeout, timeout_profile)

    async def result(self) -> Any:
        async for _ in self:
            pass
        return self.summary

    async def __aiter__(self) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        params, stream, timeout, timeout_profile = self._start
        request_id, deadline = self._transport.start(
            self._method, params, lambda item: loop.call_soon_threadsafe(inbox.put_nowait, item),
            stream=stream, timeout=timeout, timeout_profile=timeout_profile)
        finished = False
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    kind, item = await asyncio.wait_for(inbox.get(), max(0.0, remaining))
                except asyncio.TimeoutError:
                    finished = True
                    raise await loop.run_in_executor(None, self._transport.expire, request_id, self._method) \
                        from None
                if kind == "chunk":
                    yield item
                    continue
                finished = True
                self.summary = _result(item)
                return
        finally:
            if not finished:  # the consumer left early or the task was cancelled
                self._transport.cancel(request_id)
