"""Protocol test vectors: bytes with their decoded meaning, written to tests/vectors/*.json for every client.

    python -m lmport.bridge.vectors            # (re)write tests/vectors/
    python -m lmport.bridge.vectors --check    # exit 1 if the committed files are stale

Meaning is JSON with two tags so that every msgpack type survives: {"$float": x} is a float64 (1.0 stays a float),
{"$bin": "hex"} is msgpack bin. Other JSON values map directly (integers are exact: all within +-2^53).
Maps are written with keys sorted by their UTF-8 bytes, so an encoder that sorts keys reproduces the bytes exactly;
decoders must accept any key order. Vectors with "encode": false use a non-minimal encoding a decoder must accept
but an encoder never produces. docs/protocol.md explains each file.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

import msgpack

from lmport.bridge import protocol
from lmport.bridge.protocol import MAX_SAFE_INT, BridgeError

VECTOR_DIR = pathlib.Path(__file__).resolve().parents[2] / "tests" / "vectors"


class F(float):
    """Marks a float in vector sources (so 1.0 is not mistaken for 1 when tagging)."""


def canonical(value: Any) -> Any:
    """Maps with sorted keys, recursively (the byte order every vector uses)."""
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value, key=lambda k: k.encode())}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def tag(value: Any) -> Any:
    """Python value -> tagged JSON meaning."""
    if isinstance(value, float):
        return {"$float": float(value)}
    if isinstance(value, bytes):
        return {"$bin": value.hex()}
    if isinstance(value, list):
        return [tag(v) for v in value]
    if isinstance(value, dict):
        return {k: tag(v) for k, v in value.items()}
    return value


def untag(meaning: Any) -> Any:
    """Tagged JSON meaning -> Python value (what msgpack decoding must give)."""
    if isinstance(meaning, dict):
        if set(meaning) == {"$float"}:
            return float(meaning["$float"])
        if set(meaning) == {"$bin"}:
            return bytes.fromhex(meaning["$bin"])
        return {k: untag(v) for k, v in meaning.items()}
    if isinstance(meaning, list):
        return [untag(v) for v in meaning]
    return meaning


def _pack(value: Any) -> bytes:
    return msgpack.packb(canonical(value), use_bin_type=True)


def _value(name: str, value: Any, note: str = "") -> dict[str, Any]:
    entry = {"name": name, "msgpack": _pack(value).hex(), "value": tag(canonical(value))}
    return {**entry, "note": note} if note else entry


def _decode_only(name: str, hex_bytes: str, value: Any, note: str) -> dict[str, Any]:
    return {"name": name, "msgpack": hex_bytes, "value": tag(value), "encode": False, "note": note}


def value_vectors() -> list[dict[str, Any]]:
    ints = [0, 1, 127, 128, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32, MAX_SAFE_INT, -1, -32, -33, -128, -129,
            -32768, -32769, -(1 << 31), -(1 << 31) - 1, -MAX_SAFE_INT]
    vectors = [_value("nil", None), _value("true", True), _value("false", False)]
    vectors += [_value(f"int {i}", i) for i in ints]
    vectors += [_value(f"float {x!r}", F(x)) for x in (0.0, -0.0, 1.0, 1.5, -2.25, 0.1, 1e300, 5e-324)]
    vectors += [
        _value("str empty", ""), _value("str ascii", "hello"), _value("str fixstr max (31 bytes)", "a" * 31),
        _value("str str8 (32 bytes)", "b" * 32), _value("str str16 (256 bytes)", "c" * 256),
        _value("str latin accents", "héllo wörld"), _value("str CJK", "日本語のテキスト"),
        _value("str emoji (4-byte UTF-8)", "🚀 lift-off 👩‍🚀"), _value("str NUL and controls", "a\u0000b\n\t\"\\"),
        _value("bin empty", b""), _value("bin bytes", bytes([0, 1, 127, 128, 255])),
        _value("bin bin16 (300 bytes)", bytes(range(256)) + bytes(44)),
        _value("array empty", []), _value("array mixed", [1, "a", None, True, F(2.5), b"\x01"]),
        _value("array array16 (16 items)", list(range(16))), _value("array nested", [[[]], [[1]]]),
        _value("map empty", {}), _value("map one", {"a": 1}),
        _value("map map16 (16 keys)", {f"k{i:02d}": i for i in range(16)}),
        _value("map nested", {"a": {"b": {"c": [1, {"d": None, "e": []}], "f": {}}}, "z": -7}),
        _value("map unicode keys", {"ключ": "значение", "键": [1, 2], "🔑": {"ok": True}}),
    ]
    vectors += [
        _decode_only("uint32 encoding of 5", "ce00000005", 5, "non-minimal int encodings must decode"),
        _decode_only("int64 encoding of -1", "d3ffffffffffffffff", -1, "non-minimal int encodings must decode"),
        _decode_only("float32 1.5", "ca3fc00000", F(1.5), "float32 must decode (encoders send float64)"),
        _decode_only("str8 encoding of 'a'", "d90161", "a", "non-minimal str encodings must decode"),
        _decode_only("map16 with one key", "de0001a16101", {"a": 1}, "non-minimal map encodings must decode"),
    ]
    return vectors


def _frame(name: str, direction: str, message: dict[str, Any], note: str = "") -> dict[str, Any]:
    payload = _pack(message)
    entry = {"name": name, "direction": direction, "frame": (protocol.HEADER.pack(len(payload)) + payload).hex(),
             "message": tag(canonical(message))}
    return {**entry, "note": note} if note else entry


_OUTPUT = {"index": 0, "text": " Paris.", "token_ids": [7042, 30], "cumulative_logprob": None, "logprobs": None,
           "finish_reason": "length", "stop_reason": None}
_METRICS = {"arrival_time": F(1700000000.25), "first_scheduled_time": F(1700000000.5),
            "first_token_time": F(1700000000.75), "last_token_time": F(1700000001.0), "finished_time": F(1700000001.0),
            "time_in_queue": F(0.25), "num_prompt_tokens": 6, "num_generation_tokens": 2, "num_cached_tokens": 0}
_USAGE = {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8}


def message_vectors() -> list[dict[str, Any]]:
    w2h, h2w = "worker_to_host", "host_to_worker"
    hello = protocol.hello(version="0.1.0", pid=4242, pgid=4242, max_frame_bytes=protocol.DEFAULT_MAX_FRAME_BYTES,
                           max_inflight=1024, methods=["describe", "llm", "generate", "ping"],
                           timeout_profiles=protocol.TIMEOUT_PROFILES)
    handle = {"ref": "llm-1", "engine": "engine-1", "model": "smollm2", "dtype": "float32", "device": "cpu",
              "max_model_len": 8192, "num_kv_blocks": 1024, "block_size": 16, "max_num_seqs": 256,
              "max_concurrency": F(2.0)}
    request_output = {"request_id": "bridge-1-0", "prompt": "The capital of France is",
                      "prompt_token_ids": [504, 3575, 282, 4649, 314, 1], "prompt_logprobs": None,
                      "outputs": [_OUTPUT], "finished": True, "metrics": _METRICS, "num_cached_tokens": 0}
    delta = {"index": 0, "request_id": "bridge-2-0", "finished": False,
             "outputs": [{"index": 0, "text": " Paris", "token_ids": [7042], "finish_reason": None,
                          "stop_reason": None,
                          "logprobs": [[{"token_id": 7042, "logprob": F(-0.125), "rank": 1, "decoded_token": " Paris"},
                                        {"token_id": 260, "logprob": F(-2.5), "rank": 2, "decoded_token": " the"}]]}]}
    summary = {"usage": _USAGE, "requests": [
        {"index": 0, "request_id": "bridge-2-0", "prompt_tokens": 6, "num_cached_tokens": 0, "metrics": _METRICS,
         "outputs": [{"index": 0, "finish_reason": "length", "stop_reason": None, "completion_tokens": 2,
                      "cumulative_logprob": None}]}]}
    vectors = [
        _frame("hello", w2h, hello),
        _frame("request ping", h2w, protocol.request(1, "ping", {"n": 7})),
        _frame("request with a string id and no params", h2w, {"type": "request", "id": "a-1", "method": "health"},
               "params may be omitted (= {}); ids may be strings"),
        _frame("request llm", h2w, protocol.request(2, "llm", {"model": "smollm2", "dtype": "float32"})),
        _frame("request generate with timeout_ms", h2w, protocol.request(
            3, "generate", {"llm": "llm-1", "prompts": "The capital of France is",
                            "sampling_params": {"temperature": F(0.0), "max_tokens": 2}}, timeout_ms=200)),
        _frame("request streaming chat with a timeout profile", h2w, protocol.request(
            4, "chat", {"llm": {"ref": "llm-1"}, "messages": [{"role": "user", "content": "Say hi 👋"}]},
            timeout_profile="streaming", stream=True), "a handle parameter takes the map or the bare ref"),
        _frame("request tokenize", h2w, protocol.request(MAX_SAFE_INT, "tokenize", {"llm": "llm-1", "text": "héllo"}),
               "the largest id a host may use"),
        _frame("cancel", h2w, protocol.cancel(4)),
        _frame("response ping", w2h, protocol.response_ok(1, {"n": 7, "time": F(1700000000.5)})),
        _frame("response llm handle", w2h, protocol.response_ok(2, handle)),
        _frame("response generate", w2h, protocol.response_ok(3, [request_output])),
        _frame("response tokenize", w2h, protocol.response_ok(MAX_SAFE_INT, [1, 104, 2579, 25262])),
        _frame("chunk generate delta with logprobs", w2h, protocol.chunk(4, 0, delta),
               "logprobs: one list per generated position of {token_id, logprob, rank, decoded_token}"),
        _frame("response streaming summary", w2h, protocol.response_ok(4, summary)),
        _frame("event protocol_error", w2h, protocol.event("protocol_error", {
            "code": "invalid_request", "message": "frame of 70000000 bytes exceeds max_frame_bytes (67108864); "
                                                  "it was discarded",
            "details": {"length": 70000000, "max_frame_bytes": 67108864}})),
        _frame("event model_loaded", w2h, protocol.event("model_loaded", {"engine": "engine-1", "model": "smollm2"})),
        _frame("event shutting_down", w2h, protocol.event("shutting_down", {"reason": "stdin closed"})),
    ]
    details: dict[str, dict[str, Any]] = {
        "invalid_params": {"field": "sampling_params.temperature"},
        "not_found": {"field": "llm"},
        "cancelled": {"usage": _USAGE, "request_ids": ["bridge-5-0"]},
        "deadline_exceeded": {"usage": _USAGE, "request_ids": ["bridge-6-0"]},
        "memory_budget_exceeded": {"weights_bytes": 270000000, "kv_cache_bytes": 268435456, "total_bytes": 538435456,
                                   "required_bytes": 538435456, "in_use_bytes": 600000000,
                                   "budget_bytes": 1073741824,
                                   "loaded": [{"model": "smollm2", "bytes": 600000000, "busy": True}]},
    }
    for i, code in enumerate(protocol.ERROR_CODES, start=10):
        error = BridgeError(code, f"an example {code} error", details.get(code))
        if code == "internal":
            error.python_type = "builtins.RuntimeError"
            error.traceback = "Traceback (most recent call last):\n  ...\nRuntimeError: boom\n"
        vectors.append(_frame(f"response error {code}", w2h, protocol.response_error(i, error)))
    return vectors


def invalid_vectors() -> list[dict[str, Any]]:
    """Frames the worker must reject, and how (a response when the id can be read, else a protocol_error event)."""
    def framed(payload: bytes) -> str:
        return (protocol.HEADER.pack(len(payload)) + payload).hex()

    def entry(name: str, payload: bytes, expect: str, code: str, request_id: Any = None) -> dict[str, Any]:
        result = {"name": name, "frame": framed(payload), "expect": expect, "code": code}
        return {**result, "id": request_id} if request_id is not None else result

    return [
        entry("payload is a msgpack array", _pack([1, 2, 3]), "event", "invalid_request"),
        entry("payload is a msgpack string", _pack("request"), "event", "invalid_request"),
        entry("payload is not msgpack (reserved byte 0xc1)", b"\xc1\xc1\xc1", "event", "invalid_request"),
        entry("payload is truncated msgpack", _pack({"type": "request", "id": 1})[:-3], "event", "invalid_request"),
        entry("payload has trailing bytes", _pack({"type": "cancel", "id": 1}) + b"\x00", "event",
              "invalid_request"),
        entry("map with an integer key", b"\x81\x01\x02", "event", "invalid_request"),
        entry("missing id", _pack({"type": "request", "method": "ping"}), "event", "invalid_request"),
        entry("boolean id", _pack({"type": "request", "id": True, "method": "ping"}), "event", "invalid_request"),
        entry("id beyond 2^53", _pack({"type": "request", "id": MAX_SAFE_INT + 1, "method": "ping"}), "event",
              "invalid_request"),
        entry("unknown type", _pack({"type": "notify", "id": 901}), "response", "invalid_request", 901),
        entry("method is not a string", _pack({"type": "request", "id": 902, "method": 5}), "response",
              "invalid_request", 902),
        entry("params is not a map", _pack({"type": "request", "id": 903, "method": "ping", "params": [1]}),
              "response", "invalid_request", 903),
        entry("negative timeout_ms", _pack({"type": "request", "id": 904, "method": "ping", "timeout_ms": -5}),
              "response", "invalid_request", 904),
        entry("unknown timeout_profile", _pack({"type": "request", "id": 905, "method": "ping",
                                                "timeout_profile": "forever"}), "response", "invalid_request", 905),
        entry("stream on a method that does not stream", _pack({"type": "request", "id": 906, "method": "ping",
                                                                "stream": True}), "response", "invalid_request", 906),
        entry("unknown method", _pack({"type": "request", "id": 907, "method": "fly"}), "response",
              "method_not_found", 907),
        entry("unknown parameter", _pack({"type": "request", "id": 908, "method": "ping", "params": {"m": 1}}),
              "response", "invalid_params", 908),
        entry("wrong-typed parameter", _pack({"type": "request", "id": 909, "method": "ping", "params": {"n": "x"}}),
              "response", "invalid_params", 909),
        entry("missing required parameter", _pack({"type": "request", "id": 910, "method": "tokenize",
                                                   "params": {"llm": "llm-1"}}), "response", "invalid_params", 910),
        entry("unknown handle", _pack({"type": "request", "id": 911, "method": "tokenize",
                                       "params": {"llm": "llm-999", "text": "x"}}), "response", "not_found", 911),
    ]


def build_vectors() -> dict[str, dict[str, Any]]:
    header = {"protocol": protocol.PROTOCOL_VERSION, "generated_by": "python -m lmport.bridge.vectors"}
    return {"values.json": {**header, "vectors": value_vectors()},
            "messages.json": {**header, "vectors": message_vectors()},
            "invalid.json": {**header, "vectors": invalid_vectors()}}


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmport.bridge.vectors", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the files on disk differ")
    parser.add_argument("--out", type=pathlib.Path, default=VECTOR_DIR)
    args = parser.parse_args(argv)
    stale = []
    for name, doc in build_vectors().items():
        path = args.out / name
        text = render(doc)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    if stale:
        print(f"stale protocol vectors (run `python -m lmport.bridge.vectors`): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
