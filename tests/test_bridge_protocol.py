"""Framing, envelope validation, the type vocabulary and the shared protocol vectors (no worker process)."""

from __future__ import annotations

import json
import tracemalloc

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmport.bridge import protocol, vectors
from lmport.bridge.protocol import BridgeError, Cancel, EnvelopeError, FrameDecoder, OversizeFrame, Request

PROFILES = protocol.TIMEOUT_PROFILES


def test_frame_is_big_endian_length_then_one_msgpack_map():
    frame = protocol.pack({"type": "cancel", "id": 1})
    assert frame[:4] == (len(frame) - 4).to_bytes(4, "big")
    assert protocol.unpack(frame[4:]) == {"type": "cancel", "id": 1}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=8), st.integers(-(2**53), 2**53) | st.text() | st.binary(),
                                max_size=4), min_size=1, max_size=6),
       st.lists(st.integers(1, 40), max_size=30))
def test_decoder_returns_the_same_frames_whatever_the_chunking(messages, cuts):
    stream = b"".join(protocol.pack(m) for m in messages)
    decoder, frames, position = FrameDecoder(1 << 20), [], 0
    for cut in cuts + [len(stream)]:
        frames += decoder.feed(stream[position:position + cut])
        position += cut
    frames += decoder.feed(stream[position:])
    assert [protocol.unpack(f) for f in frames] == messages
    assert decoder.pending_bytes == 0


def test_oversize_frame_is_skipped_in_bounded_memory_and_the_next_frame_still_decodes():
    decoder = FrameDecoder(max_frame_bytes=1024)
    big = 8 << 20
    tracemalloc.start()
    frames = decoder.feed(big.to_bytes(4, "big") + bytes(1000))
    full, rest = divmod(big - 1000, 65536)
    for _ in range(full):
        frames += decoder.feed(bytes(65536))
    frames += decoder.feed(bytes(rest) + protocol.pack({"a": 1}))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert frames[0] == OversizeFrame(big)
    assert protocol.unpack(frames[1]) == {"a": 1}
    assert peak < 1 << 20  # nothing close to the 8 MiB frame was held


def test_truncated_stream_leaves_pending_bytes():
    decoder = FrameDecoder()
    assert decoder.feed(protocol.pack({"a": 1})[:-2]) == []
    assert decoder.pending_bytes > 0


@pytest.mark.parametrize("payload, fragment", [
    (msgpack.packb([1, 2]), "must hold a msgpack map"),
    (b"\xc1", "not one msgpack value"),
    (msgpack.packb({"a": 1}) + b"\x00", "not one msgpack value"),
    (b"\x81\x01\x02", "not one msgpack value"),  # integer key
])
def test_payloads_that_are_not_one_string_keyed_map_are_invalid_request(payload, fragment):
    with pytest.raises(BridgeError) as info:
        protocol.unpack(payload)
    assert info.value.code == "invalid_request" and fragment in info.value.message


def test_envelope_parsing_fills_defaults_and_names_bad_fields():
    assert protocol.parse_host_message({"type": "request", "id": "x", "method": "ping"}, PROFILES) == \
        Request("x", "ping", {}, None, None, False)
    assert protocol.parse_host_message({"type": "cancel", "id": 3, "extra": 1}, PROFILES) == Cancel(3)
    with pytest.raises(EnvelopeError) as info:
        protocol.parse_host_message({"type": "request", "id": 5, "method": "ping", "timeout_ms": 0}, PROFILES)
    assert info.value.request_id == 5 and "timeout_ms" in info.value.message
    with pytest.raises(EnvelopeError) as info:
        protocol.parse_host_message({"type": "request", "id": 2**53, "method": "ping"}, PROFILES)
    assert info.value.request_id is None


def test_type_vocabulary_checks_values():
    assert protocol.matches_type([1, 2], "str|list[int]")
    assert not protocol.matches_type([1, "a"], "list[int]")
    assert protocol.matches_type({"ref": "llm-1"}, "handle") and protocol.matches_type("llm-1", "handle")
    assert not protocol.matches_type({"model": "x"}, "handle")
    assert not protocol.matches_type(True, "int") and protocol.matches_type(3, "float")
    assert protocol.matches_type(None, "dict|null") and protocol.matches_type(object(), "whatever-new-type")


def test_error_codes_round_trip_through_the_wire_shape():
    error = BridgeError("overloaded", "too many", {"inflight": 3})
    again = BridgeError.from_wire(error.to_wire())
    assert (again.code, again.message, again.details, again.retryable) == ("overloaded", "too many", {"inflight": 3},
                                                                          True)
    assert set(error.to_wire()) == {"code", "message", "retryable", "details"}


def test_committed_vectors_are_current():
    for name, doc in vectors.build_vectors().items():
        path = vectors.VECTOR_DIR / name
        assert path.read_text(encoding="utf-8") == vectors.render(doc), f"{path} is stale: python -m lmport.bridge.vectors"


def _load(name):
    return json.loads((vectors.VECTOR_DIR / name).read_text(encoding="utf-8"))["vectors"]


@pytest.mark.parametrize("vector", _load("values.json"), ids=lambda v: v["name"])
def test_value_vectors_decode_and_encode(vector):
    expected = vectors.untag(vector["value"])
    decoded = msgpack.unpackb(bytes.fromhex(vector["msgpack"]), raw=False)
    assert decoded == expected and type(decoded) is type(expected)
    if vector.get("encode", True):
        assert msgpack.packb(expected, use_bin_type=True).hex() == vector["msgpack"]


@pytest.mark.parametrize("vector", _load("messages.json"), ids=lambda v: v["name"])
def test_message_vectors_are_whole_frames(vector):
    frame = bytes.fromhex(vector["frame"])
    (payload,) = FrameDecoder().feed(frame)
    assert protocol.unpack(payload) == vectors.untag(vector["message"])
    assert protocol.pack(vectors.untag(vector["message"])) == frame
    if vector["direction"] == "host_to_worker":
        protocol.parse_host_message(protocol.unpack(payload), PROFILES)


def test_every_message_type_and_error_code_has_a_vector():
    messages = [vectors.untag(v["message"]) for v in _load("messages.json")]
    assert {m["type"] for m in messages} == {"hello", "request", "cancel", "response", "chunk", "event"}
    assert {m["error"]["code"] for m in messages if m["type"] == "response" and not m["ok"]} == \
        set(protocol.ERROR_CODES)
