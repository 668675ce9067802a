"""engine_process='on': the engine runs in a child process, so the process that hosts engine.LLM (a bridge worker's
reader and writer, a server's event loop) never waits for the GIL of a step.

`EngineProcess` is the parent's side: engine.LLM in process mode forwards its streaming front to it. The child,
`python -m lmport.engine.engine_process` (nothing but EngineProcess should start it), hosts an ordinary thread-mode
engine.LLM and serves it over a socketpair, one pickled message per frame:

    parent -> child   ("load", options, torch_threads) first, then ("add", call, kind, payload) ("abort", request_id)
                      ("stats", call) ("footprint", call) ("shutdown",)
    child -> parent   ("ready", facts, stats) or ("load_error", error) first, then ("reply", call, ok, value_or_error)
                      ("outputs", [(request_id, output), ...]) once per engine step, ("dead", error)

Adds are validated in the child and answered before the caller's add returns (all or none; an error keeps its type,
field, message and index). A parent reader thread routes replies; a dispatcher thread calls on_output / on_error in
the order the child's engine produced them, so a callback may call back into the LLM.

No child outlives its parent: the child gets SIGKILL when the parent's thread that started it ends
(PR_SET_PDEATHSIG, lmport.engine.tp_worker's _die_with_parent; that thread is the reader, which lives until the
child is gone), stays in the parent's process group (the clients kill the group) and stops when its socket closes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import logging
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from lmport.engine.config import EngineConfig
from lmport.engine.errors import InvalidParams
from lmport.engine.llm import EngineDead, RequestStream

logger = logging.getLogger("lmport")

_HEADER = 8  # little-endian frame length
EXIT_TIMEOUT_S = 30.0  # from the socket closing to the child's exit


# --- the wire: length-prefixed pickles, errors as (class, args, attributes) ---

class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._file = sock.makefile("rb")
        self._send_lock = threading.Lock()

    def send(self, message: tuple) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            self.sock.sendall(len(data).to_bytes(_HEADER, "little") + data)

    def recv(self) -> tuple | None:
        """The next message; None once the other side closed (or died)."""
        try:
            header = self._file.read(_HEADER)
            if len(header) < _HEADER:
                return None
            length = int.from_bytes(header, "little")
            data = self._file.read(length)
        except OSError:
            return None
        return pickle.loads(data) if len(data) == length else None

    def close(self) -> None:
        self._file.close()
        self.sock.close()


def pack_error(exc: BaseException) -> tuple[Any, tuple, dict[str, Any]]:
    """An exception as (class, args, attributes): pickling an exception re-runs its __init__ with args, which
    InvalidParams(field, message) and its kin do not take. Classes or values that do not pickle become a
    RuntimeError naming the original type."""
    packed = (type(exc), exc.args, dict(getattr(exc, "__dict__", {})))
    try:
        pickle.dumps(packed)
    except Exception:  # noqa: BLE001 — a local class, an unpicklable attribute: keep the message at least
        return RuntimeError, (f"{type(exc).__name__}: {exc}",), {}
    return packed


def unpack_error(packed: tuple[Any, tuple, dict[str, Any]]) -> BaseException:
    cls, args, state = packed
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


# --- the parent's side ---

@dataclasses.dataclass
class EngineFacts:
    """What the parent knows of the child's engine (engine.LLM.engine in process mode): the resolved facts the
    bridge reads. The model's tensors stay in the child."""
    config: EngineConfig
    model_path: str
    dtype: Any  # torch.dtype
    device: Any  # torch.device
    vocab_size: int
    max_model_len: int
    num_kv_blocks: int
    is_encoder: bool
    tokenizer: Any
    pid: int


@dataclasses.dataclass(slots=True)
class _InFlight:
    deliver: Callable[[Any], None]
    on_error: Callable[[BaseException], None]


class _Reply:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False
        self.value: Any = None


class EngineProcess:
    """The parent's end of one engine child: starts it and waits for its load (a load error is raised here)."""

    def __init__(self, config: EngineConfig) -> None:
        self._ids = itertools.count()
        self._calls = itertools.count()
        self._lock = threading.Lock()
        self._inflight: dict[str, _InFlight] = {}
        self._replies: dict[int, _Reply] = {}
        self._dead: BaseException | None = None  # why the child went away, unless it was shut down
        self._gone: EngineDead | None = None  # set once the child's socket closed
        self._stopping = False
        self._last_stats: dict[str, Any] = {}
        self._events: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self.returncode: int | None = None
        parent_sock, child_sock = socket.socketpair()
        self._conn = _Connection(parent_sock)
        self._started = threading.Event()
        self._load: tuple | None = None
        self.process: subprocess.Popen[bytes] | None = None
        # the reader starts the child: PR_SET_PDEATHSIG ties the child's life to the thread that started it
        self._reader = threading.Thread(target=self._read_loop, args=(config, child_sock), name="lmport-engine-io",
                                        daemon=True)
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="lmport-engine-out", daemon=True)
        self._reader.start()
        self._dispatcher.start()
        self._started.wait()
        assert self._load is not None
        if self._load[0] != "ready":
            self._reader.join()
            self._dispatcher.join()
            raise self._load[1]
        self.facts: EngineFacts = self._load[1]

    # --- requests ---

    def add(self, kind: str, payload: tuple, request_ids: list[str | None],
            on_output: Callable[[int, Any], None] | None, on_error: Callable[[BaseException], None] | None,
            stream_owner: Any) -> list[Any]:
        """Register the requests, have the child validate and queue them (all or none), return their streams.
        kind: 'generate' (prompts, params, adapters), 'generate1' (prompt, params, adapter) or 'embed' (inputs,
        params)."""
        ids = [rid if rid is not None else f"req-{next(self._ids)}" for rid in request_ids]
        streams = [RequestStream(rid, stream_owner) for rid in ids]
        with self._lock:
            self._check_open()
            for rid in ids:
                if rid in self._inflight:
                    raise InvalidParams("request_id", f"request id {rid!r} is already in flight")
            for i, (rid, stream) in enumerate(zip(ids, streams)):
                deliver = stream._put if on_output is None else functools.partial(on_output, i)
                self._inflight[rid] = _InFlight(deliver, on_error or stream._put)
        try:
            self._call("add", kind, payload, ids)
        except BaseException:
            with self._lock:
                for rid in ids:
                    self._inflight.pop(rid, None)
            raise
        return streams

    def abort(self, request_id: str) -> bool:
        with self._lock:
            known = request_id in self._inflight and self._gone is None
        if known:
            self._send(("abort", request_id))
        return known

    def stats(self) -> dict[str, Any]:
        try:
            self._last_stats = self._call("stats")
        except EngineDead:
            pass  # as a dead thread-mode engine: its last counters
        return self._last_stats

    def memory_footprint(self) -> tuple[int, int]:
        return tuple(self._call("footprint"))  # type: ignore[return-value]

    def shutdown(self) -> None:
        """Every request in flight finishes (finish_reason 'abort') and the child exits."""
        with self._lock:
            self._stopping = True
        self._send(("shutdown",))
        if threading.current_thread() is not self._dispatcher:
            self._reader.join()
            self._dispatcher.join()

    def _check_open(self) -> None:
        if self._dead is not None:
            raise EngineDead(f"the engine stopped after an error: {self._dead}")
        if self._stopping:
            raise EngineDead("the engine is shutting down")

    def _call(self, op: str, *args: Any) -> Any:
        reply = _Reply()
        with self._lock:
            if self._gone is not None:
                raise EngineDead(str(self._gone))
            call = next(self._calls)
            self._replies[call] = reply
        self._send((op, call, *args))
        reply.done.wait()
        if not reply.ok:
            raise reply.value
        return reply.value

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except OSError:
            pass  # the child is gone: the reader fails what is waiting

    # --- the reader: starts the child, routes replies, queues outputs for the dispatcher ---

    def _read_loop(self, config: EngineConfig, child_sock: socket.socket) -> None:
        from lmport.engine.tp_worker import rank_pythonpath

        try:
            try:
                # stdout goes to stderr: a bridge worker's fd 1 is already stderr, and the child writes no frames
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "lmport.engine.engine_process", "--fd", str(child_sock.fileno()),
                     "--parent", str(os.getpid())],
                    stdin=subprocess.DEVNULL, stdout=2, pass_fds=[child_sock.fileno()],
                    env={**os.environ, "PYTHONPATH": rank_pythonpath()})
            finally:
                child_sock.close()
            import torch

            # the child computes with this process's intra-op threads, as a thread-mode engine would
            self._conn.send(("load", config.replace(engine_process="off").to_dict(), torch.get_num_threads()))
        except BaseException as exc:  # noqa: BLE001 — raised from the constructor
            self._load = ("load_error", exc)
            self._finish(exc)
            return
        try:
            self._route()
        except Exception:  # noqa: BLE001 — a message that does not decode: the child is of no further use
            logger.exception("engine process: bad message")
            self.process.kill()
        self._finish(None)

    def _route(self) -> None:
        while (message := self._conn.recv()) is not None:
            op = message[0]
            if op == "reply":
                _, call, ok, value = message
                with self._lock:
                    reply = self._replies.pop(call)
                reply.ok, reply.value = ok, value if ok else unpack_error(value)
                reply.done.set()
            elif op in ("outputs", "dead"):
                self._events.put(message)
            elif op == "ready":
                self._load, self._last_stats = ("ready", message[1]), message[2]
                self._started.set()
            elif op == "load_error":
                self._load = ("load_error", unpack_error(message[1]))

    def _finish(self, start_error: BaseException | None) -> None:
        """The child closed its end: wait for its exit, fail whatever still waits, stop the dispatcher."""
        if self.process is not None:
            try:
                self.returncode = self.process.wait(EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.returncode = self.process.wait()
        self._conn.close()
        code = self.returncode
        how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited ({code})"
        gone = EngineDead(f"the engine process {how}")
        if self._load is None:
            self._load = ("load_error", start_error or RuntimeError(f"the engine process {how} while loading; "
                                                                   "see its stderr"))
        with self._lock:
            self._gone = gone
            if not self._stopping:
                self._dead = gone
            replies, self._replies = self._replies, {}
        for reply in replies.values():
            reply.ok, reply.value = False, gone
            reply.done.set()
        self._events.put(("gone", gone))
        self._events.put(None)
        self._started.set()

    def _dispatch_loop(self) -> None:
        while (event := self._events.get()) is not None:
            if event[0] == "outputs":
                for request_id, output in event[1]:
                    with self._lock:
                        entry = self._inflight.pop(request_id) if output.finished else self._inflight.get(request_id)
                    if entry is not None:
                        entry.deliver(output)
            else:  # "dead": the child's engine failed (its LLM refuses later adds itself); "gone": the child
                # exited (after a shutdown nothing is left in flight)
                error = unpack_error(event[1]) if event[0] == "dead" else event[1]
                with self._lock:
                    entries, self._inflight = self._inflight, {}
                for entry in entries.values():
                    entry.on_error(error)


# --- the child's side ---

class _Outbox:
    """The child's outputs of one engine step, sent as one message after the step (LLM._on_step)."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._outputs: list[tuple[str, Any]] = []
        self._error: BaseException | None = None

    def output(self, request_id: str, output: Any) -> None:
        with self._lock:
            self._outputs.append((request_id, output))

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            self._error = self._error or exc

    def flush(self) -> None:
        with self._lock:
            outputs, self._outputs = self._outputs, []
            error, self._error = self._error, None
        try:
            if outputs:
                self._conn.send(("outputs", outputs))
            if error is not None:
                self._conn.send(("dead", pack_error(error)))
        except OSError:
            pass  # the parent is gone: the reader stops the engine


def _facts(llm: Any) -> EngineFacts:
    engine = llm.engine
    return EngineFacts(config=llm.config, model_path=str(engine.model_path), dtype=engine.dtype, device=engine.device,
                       vocab_size=engine.vocab_size, max_model_len=llm.max_model_len, num_kv_blocks=llm.num_kv_blocks,
                       is_encoder=llm.is_encoder, tokenizer=llm.tokenizer, pid=os.getpid())


def _add(llm: Any, outbox: _Outbox, kind: str, payload: tuple, ids: list[str]) -> None:
    on_error = outbox.fail
    if kind == "generate1":
        prompt, params, adapter = payload
        llm.add_request(prompt, params, ids[0], on_output=functools.partial(outbox.output, ids[0]),
                        on_error=on_error, lora_request=adapter)
        return

    def on_output(i: int, output: Any) -> None:
        outbox.output(ids[i], output)

    if kind == "generate":
        prompts, params, adapters = payload
        llm.add_requests(prompts, params, ids, on_output=on_output, on_error=on_error, lora_request=adapters)
    else:
        inputs, params = payload
        llm.add_embed_requests(inputs, params, ids, on_output=on_output, on_error=on_error)


def serve(conn: _Connection) -> int:
    """Load the engine the parent asks for, then serve its commands until shutdown or the socket closes."""
    from lmport.engine.llm import LLM

    import torch

    first = conn.recv()
    if first is None:
        return 1
    torch.set_num_threads(first[2])
    try:
        llm = LLM(**first[1])
    except BaseException as exc:  # noqa: BLE001 — raised from the parent's LLM(...)
        logger.debug("load failed", exc_info=True)
        conn.send(("load_error", pack_error(exc)))
        return 1
    outbox = _Outbox(conn)
    llm._on_step = outbox.flush
    conn.send(("ready", _facts(llm), llm.stats()))
    handlers: dict[str, Callable[..., Any]] = {
        "add": functools.partial(_add, llm, outbox), "stats": llm.stats, "footprint": llm.memory_footprint}
    while (message := conn.recv()) is not None:
        op = message[0]
        if op == "abort":
            llm.abort(message[1])
        elif op == "shutdown":
            break
        else:
            call, args = message[1], message[2:]
            try:
                reply = ("reply", call, True, handlers[op](*args))
            except Exception as exc:  # noqa: BLE001 — the caller's error, raised in the parent
                reply = ("reply", call, False, pack_error(exc))
            conn.send(reply)
    llm.shutdown()  # every request finishes (aborted), then the last outputs go out
    outbox.flush()
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    from lmport.engine.tp_worker import _die_with_parent

    _die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the whole group: the parent stops us
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="lmport engine process: %(levelname)s %(message)s")
    sock = socket.socket(fileno=args.fd)
    os.set_inheritable(args.fd, False)  # tensor-parallel ranks must not hold it: the parent waits for its close
    conn = _Connection(sock)
    try:
        code = serve(conn)
    except Exception:  # noqa: BLE001
        logger.exception("engine process failed")
        code = 1
    sys.stderr.flush()
    os._exit(code)  # the engine's threads are done or daemon; nothing else needs to run


if __name__ == "__main__":  # run as lmport.engine.engine_process, so what it pickles names that module
    from lmport.engine.engine_process import main as _main

    _main()
