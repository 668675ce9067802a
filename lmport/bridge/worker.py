"""`lmport worker` / `python -m lmport.bridge.worker`: lmport.bridge.service over msgpack frames on stdin/stdout.

Threads: the main thread owns signals and the orderly stop; a reader decodes frames and never waits for the engine
(admission runs on a small pool, ping and cancel are handled inline); one writer owns the frames fd; a watchdog
notices parent death. docs/protocol.md describes the behaviour from the host's side.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import itertools
import logging
import os
import queue
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil

from lmport.bridge import protocol
from lmport.bridge.protocol import BridgeError, Cancel, EnvelopeError, OversizeFrame
from lmport.bridge.service import METHODS, VERSION, Call, Service

logger = logging.getLogger("lmport.worker")
PR_SET_PDEATHSIG = 1
ADMISSION_THREADS = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-frame-bytes", type=int, default=protocol.DEFAULT_MAX_FRAME_BYTES,
                        help="longest host frame accepted; longer ones are discarded (default 64 MiB)")
    parser.add_argument("--max-inflight", type=int, default=protocol.DEFAULT_MAX_INFLIGHT,
                        help="requests in flight before new ones are answered 'overloaded' (default 1024)")
    parser.add_argument("--timeout-profile", action="append", default=[], metavar="NAME=MS",
                        help="override or add a timeout profile, e.g. default=60000 (repeatable)")
    parser.add_argument("--grace", type=float, default=5.0,
                        help="seconds an orderly stop waits for aborted requests and child processes (default 5)")
    parser.add_argument("--no-setsid", action="store_true", help="stay in the parent's process group")
    parser.add_argument("--debug", action="store_true", help="add Python tracebacks to error responses")
    parser.add_argument("--memory-budget-gb", type=float, default=None, metavar="GIB",
                        help="GiB the loaded engines may hold together (estimated weights + KV cache); a load that "
                             "would not fit unloads idle engines (least recently used first) or is refused with "
                             "memory_budget_exceeded (default: no budget)")
    parser.add_argument("--preload", action="append", default=[], metavar="MODULE",
                        help="import a module at start, after stdout is protected (plugins, instrumentation)")


def run(args: argparse.Namespace) -> int:
    parent_pid = os.getppid()  # before --preload imports: a parent dying during them must still be noticed
    frames_fd = protect_stdout()
    profiles = dict(protocol.TIMEOUT_PROFILES)
    for item in args.timeout_profile:
        name, _, ms = item.partition("=")
        if not name or not ms.isdigit() or int(ms) <= 0:
            logger.error("--timeout-profile expects NAME=MS with MS > 0, got %r", item)
            return 2
        profiles[name] = int(ms)
    if args.memory_budget_gb is not None and args.memory_budget_gb <= 0:
        logger.error("--memory-budget-gb must be > 0, got %s", args.memory_budget_gb)
        return 2
    budget = None if args.memory_budget_gb is None else int(args.memory_budget_gb * (1 << 30))
    for flag, value in (("--max-inflight", args.max_inflight), ("--max-frame-bytes", args.max_frame_bytes)):
        if value <= 0:  # 0 would answer every request 'overloaded' / discard every frame as oversize
            logger.error("%s must be > 0, got %d", flag, value)
            return 2
    if not args.no_setsid:
        try:
            os.setsid()
        except PermissionError:  # already a group leader (spawned with start_new_session)
            pass
    for module in args.preload:
        importlib.import_module(module)
    service = Service(profiles, debug=args.debug, memory_budget_bytes=budget)
    worker = Worker(frames_fd, service, args.max_frame_bytes, args.max_inflight, args.grace, parent_pid)
    return worker.serve()


def protect_stdout() -> int:
    """Keep a private duplicate of fd 1 for frames; point fd 1 and sys.stdout at stderr so stray output from
    Python or C code cannot corrupt the stream."""
    frames_fd = os.dup(1)  # non-inheritable: child processes never get the frames fd
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return frames_fd


class Worker:
    def __init__(self, frames_fd: int, service: Service, max_frame_bytes: int, max_inflight: int,
                 grace: float, parent_pid: int | None = None) -> None:
        self.frames_fd = frames_fd
        self.service = service
        self.max_frame_bytes = max_frame_bytes
        self.max_inflight = max_inflight
        self.grace = grace
        self.parent_pid = os.getppid() if parent_pid is None else parent_pid  # the watchdog compares against it
        self._calls: dict[int | str, Call] = {}  # in flight (not pings); reader inserts, callbacks remove
        self._out: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._stop_reason = ""
        self._signal_name = ""  # set by the SIGTERM/SIGINT handler, acted on by the main loop
        self._admission = ThreadPoolExecutor(ADMISSION_THREADS, thread_name_prefix="lmport-admit")
        service.on_event = lambda name, data: self._send(protocol.event(name, data))

    # --- lifecycle ---

    def serve(self) -> int:
        self._watch_parent()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        writer = threading.Thread(target=self._write_loop, name="lmport-writer", daemon=True)
        writer.start()
        self._send(protocol.hello(version=VERSION, pid=os.getpid(), pgid=os.getpgrp(),
                                  max_frame_bytes=self.max_frame_bytes, max_inflight=self.max_inflight,
                                  methods=list(METHODS), timeout_profiles=self.service.timeout_profiles))
        threading.Thread(target=self._read_loop, name="lmport-reader", daemon=True).start()
        while not self._stop.wait(0.5):  # the main thread stays free for signal handlers
            if self._signal_name:
                self.stop(self._signal_name)
        logger.info("worker stopping: %s", self._stop_reason)
        self._send(protocol.event("shutting_down", {"reason": self._stop_reason}))
        self.service.close(self.grace)
        for call in list(self._calls.values()):  # still queued for admission: never reached the service
            call.finish(error=BridgeError("shutting_down", "the worker is shutting down"))
        self._out.put(None)
        writer.join(self.grace)
        kill_children(self.grace)
        sys.stderr.flush()
        os._exit(0)  # admission threads may sit in a model load; nothing else needs to run

    def _on_signal(self, signum: int, frame: object) -> None:
        # Only a plain store: the handler runs on the main thread between bytecodes, possibly inside
        # Event.wait's `with self._cond`, where Event.set would deadlock on the same non-reentrant lock.
        self._signal_name = signal.Signals(signum).name

    def stop(self, reason: str) -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    def _watch_parent(self) -> None:
        """PR_SET_PDEATHSIG (from the main thread, as the kernel ties it to the calling thread) plus a getppid
        watchdog for the cases it misses (the parent died before prctl, non-Linux)."""
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (AttributeError, OSError):
            pass

        def watch() -> None:
            while not self._stop.wait(0.5):
                if os.getppid() != self.parent_pid:
                    self.stop("parent process died")

        threading.Thread(target=watch, name="lmport-watchdog", daemon=True).start()

    # --- output: one writer owns the frames fd ---

    def _send(self, message: dict[str, Any]) -> None:
        self._out.put(protocol.pack(message))

    def _write_loop(self) -> None:
        broken = False
        while True:
            frame = self._out.get()
            frames = [frame]
            while frame is not None and not self._out.empty():  # coalesce what is queued into one write
                frame = self._out.get()
                frames.append(frame)
            data = b"".join(f for f in frames if f is not None)
            if not broken:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(self.frames_fd, view):]
                except OSError:  # the host closed its end: nobody to answer any more
                    broken = True
                    self.stop("stdout closed")
            if frame is None:
                return

    # --- input: the reader never waits for the engine ---

    def _read_loop(self) -> None:
        decoder = protocol.FrameDecoder(self.max_frame_bytes)
        while True:
            try:
                data = os.read(0, 1 << 20)
            except OSError:
                data = b""
            if not data:
                if decoder.pending_bytes:
                    self._protocol_error(f"stdin ended inside a frame ({decoder.pending_bytes} bytes pending)")
                self.stop("stdin closed")
                return
            for frame in decoder.feed(data):
                try:
                    self._handle(frame)
                except Exception as exc:  # noqa: BLE001 — bad input never kills the worker
                    logger.exception("failed to handle a frame")
                    self._protocol_error(f"internal error handling a frame: {type(exc).__name__}: {exc}", "internal")

    def _handle(self, frame: bytes | OversizeFrame) -> None:
        if isinstance(frame, OversizeFrame):
            self._protocol_error(f"frame of {frame.length} bytes exceeds max_frame_bytes ({self.max_frame_bytes}); "
                                 "it was discarded", details={"length": frame.length,
                                                              "max_frame_bytes": self.max_frame_bytes})
            return
        try:
            message = protocol.parse_host_message(protocol.unpack(frame), self.service.timeout_profiles)
        except EnvelopeError as exc:
            if exc.request_id is None:
                self._protocol_error(exc.message)
            else:
                self._send(protocol.response_error(exc.request_id, exc))
            return
        except BridgeError as exc:
            self._protocol_error(exc.message)
            return
        if isinstance(message, Cancel):
            call = self._calls.get(message.id)
            if call is not None:
                call.cancel()
            return
        if message.id in self._calls:
            self._protocol_error(f"id {message.id!r} is already in flight; the duplicate request was ignored",
                                 details={"id": message.id})
            return
        call = Call(message.id, message.method, message.params, stream=message.stream,
                    timeout_ms=message.timeout_ms, timeout_profile=message.timeout_profile,
                    on_chunk=self._chunk_sender(message.id), on_done=self._responder(message.id, message.method))
        if message.method == "ping":  # the heartbeat: answered right here, whatever the engine is doing
            self.service.submit(call)
            return
        if len(self._calls) >= self.max_inflight:
            self._send(protocol.response_error(message.id, BridgeError(
                "overloaded", f"{len(self._calls)} requests in flight (max_inflight {self.max_inflight})")))
            return
        self._calls[message.id] = call
        self._admission.submit(self.service.submit, call)

    def _chunk_sender(self, request_id: int | str) -> Any:
        seq = itertools.count()
        return lambda data: self._send(protocol.chunk(request_id, next(seq), data))

    def _responder(self, request_id: int | str, method: str) -> Any:
        def respond(result: Any, error: BridgeError | None) -> None:
            self._calls.pop(request_id, None)
            if error is None:
                try:
                    frame = protocol.pack(protocol.response_ok(request_id, result))
                except Exception as exc:  # noqa: BLE001 — a result that cannot be encoded is still answered
                    error = BridgeError("internal", f"the result could not be encoded: {exc}")
            if error is not None:
                try:
                    frame = protocol.pack(protocol.response_error(request_id, error))
                except Exception as exc:  # noqa: BLE001 — so is an error with unencodable details
                    frame = protocol.pack(protocol.response_error(request_id, BridgeError(
                        "internal", f"a {error.code!r} error could not be encoded: {exc}")))
            self._out.put(frame)
            if error is None and method == "shutdown":
                self.stop("shutdown requested")
        return respond

    def _protocol_error(self, message: str, code: str = "invalid_request",
                        details: dict[str, Any] | None = None) -> None:
        data: dict[str, Any] = {"code": code, "message": message}
        if details:
            data["details"] = details
        self._send(protocol.event("protocol_error", data))


def kill_children(grace: float) -> None:
    """TERM every descendant, wait up to the grace, then KILL what is left."""
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=grace)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmport.bridge.worker", description="lmport stdio worker")
    parser.add_argument("--log-level", default="INFO")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
