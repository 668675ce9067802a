"""Wire protocol v1: framing, message shapes, error codes, limits and the manifest's type vocabulary.

A frame is a 4-byte unsigned big-endian length N followed by N bytes holding exactly one msgpack map (Erlang's
`{:packet, 4}`). Pure data + pure functions: no threads, no I/O — the worker, the shim and the tests share it.
docs/protocol.md is the user-facing reference for everything here.
"""

from __future__ import annotations

import math
import struct
import types
import typing
from dataclasses import dataclass
from typing import Any, NewType

import msgpack

PROTOCOL_VERSION = 1
SERVER_NAME = "lmport"
DEFAULT_MAX_FRAME_BYTES = 64 << 20
DEFAULT_MAX_INFLIGHT = 1024
MAX_SAFE_INT = (1 << 53) - 1  # JavaScript's Number.MAX_SAFE_INTEGER: every id and counter stays within +-this
HEADER = struct.Struct(">I")

TIMEOUT_PROFILES: dict[str, int] = {"default": 120_000, "streaming": 1_800_000, "ml_inference": 600_000,
                                    "batch_job": 3_600_000}

# code -> (retryable, doc). The order is the manifest's order.
ERROR_CODES: dict[str, tuple[bool, str]] = {
    "invalid_request": (False, "Not a well-formed message: a missing or wrong-typed envelope field, a duplicate id, "
                               "stream on a method that does not stream."),
    "method_not_found": (False, "No method of that name; `describe` lists them."),
    "invalid_params": (False, "A parameter is missing, unknown, of the wrong type or out of range; details.field "
                              "names it."),
    "unsupported": (False, "A recognised option or value lmport does not implement (vLLM's swap_space, "
                           "pipeline_parallel_size > 1, ...); details.field names it and the message says what to use "
                           "instead."),
    "not_found": (False, "An unknown handle ref (released, or never created), or a model that is not available "
                         "locally (details.field = 'model')."),
    "cancelled": (False, "The host cancelled the request (or released its LLM handle); details.usage holds the "
                         "tokens already computed."),
    "deadline_exceeded": (False, "The request ran past its deadline and was aborted in the engine; details.usage "
                                 "holds the tokens already computed."),
    "overloaded": (True, "More than max_inflight requests are in flight; retry after some finish."),
    "out_of_memory": (False, "A prompt that can never fit the KV cache, or the device ran out of memory."),
    "memory_budget_exceeded": (False, "Loading the model would exceed the worker's memory budget even after "
                                      "unloading its idle models; details carry the numbers (required_bytes = "
                                      "weights_bytes + kv_cache_bytes, in_use_bytes, budget_bytes, loaded). "
                                      "Retryable (the error says so) when busy models hold the room."),
    "engine_error": (False, "The engine failed (a step raised); the message says why."),
    "shutting_down": (True, "The worker is stopping; retry on a fresh worker."),
    "internal": (False, "A bug in the worker; the message (and traceback under --debug) says where."),
}

class BridgeError(Exception):
    """An error with a protocol code. Raised by the service, sent as a response error, raised again by clients."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None, *,
                 retryable: bool | None = None, python_type: str | None = None,
                 traceback: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details
        self.retryable = ERROR_CODES.get(code, (False, ""))[0] if retryable is None else retryable
        self.python_type = python_type
        self.traceback = traceback

    def to_wire(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "retryable": self.retryable}
        for key in ("details", "python_type", "traceback"):
            if getattr(self, key) is not None:
                error[key] = getattr(self, key)
        return error

    @classmethod
    def from_wire(cls, error: Any) -> BridgeError:
        if not isinstance(error, dict):
            return cls("internal", f"malformed error object: {error!r}")
        return cls(str(error.get("code", "internal")), str(error.get("message", "")), error.get("details"),
                   retryable=bool(error.get("retryable", False)), python_type=error.get("python_type"),
                   traceback=error.get("traceback"))


# --- framing ---

def pack(message: dict[str, Any]) -> bytes:
    """One frame: header + msgpack map (str for text, bin for bytes)."""
    payload = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(payload)) + payload


def unpack(payload: bytes) -> dict[str, Any]:
    """Decode one frame's payload; anything but a single msgpack map with string keys is invalid_request."""
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 — msgpack raises many types (ExtraData, FormatError, ValueError, ...)
        raise BridgeError("invalid_request", f"payload is not one msgpack value: {type(exc).__name__}: {exc}") \
            from None
    if not isinstance(message, dict):
        raise BridgeError("invalid_request", f"a frame must hold a msgpack map, got {type(message).__name__}")
    if not all(isinstance(k, str) for k in message):
        raise BridgeError("invalid_request", "map keys must be strings")
    return message


@dataclass(slots=True)
class OversizeFrame:
    """A frame longer than max_frame_bytes; its bytes were skipped, never held."""
    length: int


class FrameDecoder:
    """Incremental frame splitter: feed() bytes in any chunking, get whole payloads back.

    Memory stays bounded by max_frame_bytes: an oversize frame is skipped as it streams by and reported once
    as OversizeFrame. Both the worker (with a limit) and the clients (limit None) use it.
    """

    def __init__(self, max_frame_bytes: int | None = None) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._skip = 0  # bytes of an oversize frame still to discard
        self._skipped_length = 0

    def feed(self, data: bytes) -> list[bytes | OversizeFrame]:
        frames: list[bytes | OversizeFrame] = []
        view = memoryview(data)
        if self._skip:
            taken = min(self._skip, len(view))
            self._skip -= taken
            view = view[taken:]
            if not self._skip:
                frames.append(OversizeFrame(self._skipped_length))
        self._buffer += view
        buffer, start = self._buffer, 0
        while len(buffer) - start >= HEADER.size:
            (length,) = HEADER.unpack_from(buffer, start)
            if self.max_frame_bytes is not None and length > self.max_frame_bytes:
                available = len(buffer) - start - HEADER.size
                if available >= length:
                    start += HEADER.size + length
                    frames.append(OversizeFrame(length))
                    continue
                self._skip, self._skipped_length = length - available, length
                start = len(buffer)
                break
            end = start + HEADER.size + length
            if len(buffer) < end:
                break
            frames.append(bytes(buffer[start + HEADER.size:end]))
            start = end
        del buffer[:start]
        return frames

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete frame (non-zero at EOF means the stream ended mid-frame)."""
        return len(self._buffer) + self._skip


# --- messages ---

def hello(*, version: str, pid: int, pgid: int, max_frame_bytes: int, max_inflight: int, methods: list[str],
          timeout_profiles: dict[str, int]) -> dict[str, Any]:
    return {"type": "hello", "protocol": PROTOCOL_VERSION, "server": SERVER_NAME, "version": version, "pid": pid,
            "pgid": pgid, "max_frame_bytes": max_frame_bytes, "max_inflight": max_inflight, "methods": methods,
            "timeout_profiles": timeout_profiles}


def response_ok(request_id: int | str, result: Any) -> dict[str, Any]:
    return {"type": "response", "id": request_id, "ok": True, "result": result}


def response_error(request_id: int | str, error: BridgeError) -> dict[str, Any]:
    return {"type": "response", "id": request_id, "ok": False, "error": error.to_wire()}


def chunk(request_id: int | str, seq: int, data: Any) -> dict[str, Any]:
    return {"type": "chunk", "id": request_id, "seq": seq, "data": data}


def event(name: str, data: Any = None) -> dict[str, Any]:
    return {"type": "event", "name": name, "data": data}


def request(request_id: int | str, method: str, params: dict[str, Any] | None = None, *,
            timeout_ms: int | None = None, timeout_profile: str | None = None,
            stream: bool = False) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "request", "id": request_id, "method": method, "params": params or {}}
    if timeout_ms is not None:
        message["timeout_ms"] = timeout_ms
    if timeout_profile is not None:
        message["timeout_profile"] = timeout_profile
    if stream:
        message["stream"] = True
    return message


def cancel(request_id: int | str) -> dict[str, Any]:
    return {"type": "cancel", "id": request_id}


@dataclass(slots=True)
class Request:
    id: int | str
    method: str
    params: dict[str, Any]
    timeout_ms: int | None = None
    timeout_profile: str | None = None
    stream: bool = False


@dataclass(slots=True)
class Cancel:
    id: int | str


class EnvelopeError(BridgeError):
    """A host message that is not well formed; request_id is set when the id could be read (-> response)."""

    def __init__(self, message: str, request_id: int | str | None) -> None:
        super().__init__("invalid_request", message)
        self.request_id = request_id


def valid_id(value: Any) -> bool:
    return (isinstance(value, str) and 0 < len(value) <= 256) or \
        (isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_SAFE_INT)


def parse_host_message(message: dict[str, Any], timeout_profiles: dict[str, int]) -> Request | Cancel:
    """Validate a host -> worker message (unknown keys are ignored). Raises EnvelopeError."""
    kind = message.get("type")
    request_id = message.get("id")
    if not valid_id(request_id):
        raise EnvelopeError(f"'id' must be a non-empty string or an integer within +-2^53, got {request_id!r}", None)
    if kind == "cancel":
        return Cancel(request_id)
    if kind != "request":
        raise EnvelopeError(f"'type' must be 'request' or 'cancel', got {kind!r}", request_id)
    method, params = message.get("method"), message.get("params", {})
    timeout_ms, profile, stream = message.get("timeout_ms"), message.get("timeout_profile"), message.get("stream")
    if not isinstance(method, str):
        raise EnvelopeError(f"'method' must be a string, got {method!r}", request_id)
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise EnvelopeError(f"'params' must be a map, got {type(params).__name__}", request_id)
    if timeout_ms is not None and (not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool)
                                   or not 0 < timeout_ms <= MAX_SAFE_INT):
        raise EnvelopeError(f"'timeout_ms' must be a positive integer, got {timeout_ms!r}", request_id)
    if profile is not None and profile not in timeout_profiles:
        raise EnvelopeError(f"'timeout_profile' must be one of {sorted(timeout_profiles)}, got {profile!r}",
                            request_id)
    if stream is not None and not isinstance(stream, bool):
        raise EnvelopeError(f"'stream' must be a boolean, got {stream!r}", request_id)
    return Request(request_id, method, params, timeout_ms, profile, bool(stream))


# --- the manifest's type vocabulary ("str", "int", "list[int]", "handle", unions joined by "|") ---

Handle = NewType("Handle", dict)  # a handle map {"ref": ...} or the bare ref string

_SCALARS: dict[Any, str] = {str: "str", int: "int", float: "float", bool: "bool", type(None): "null", dict: "dict",
                            list: "list", Any: "any", Handle: "handle"}


def type_string(annotation: Any) -> str:
    """Render a resolved annotation in the vocabulary; anything outside it is "any"."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return "|".join(type_string(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        inner = type_string(args[0]) if args else "any"
        return f"list[{inner}]" if inner in ("int", "str", "dict", "float") else "list"
    if origin is dict:
        return "dict"
    return _SCALARS.get(annotation, "any")


def matches_type(value: Any, type_str: str) -> bool:
    """Does a decoded wire value fit a vocabulary type string?"""
    return any(_matches_one(value, t) for t in type_str.split("|"))


def _matches_one(value: Any, t: str) -> bool:
    if t.startswith("list[") and t.endswith("]"):
        return isinstance(value, list) and all(_matches_one(v, t[5:-1]) for v in value)
    if t == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if t == "handle":
        return isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("ref"), str))
    checks: dict[str, Any] = {"str": str, "bool": bool, "dict": dict, "list": list, "null": type(None)}
    return t not in checks or isinstance(value, checks[t])  # "any" and unknown types accept anything
