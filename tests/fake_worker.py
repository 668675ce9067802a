"""A scripted stand-in for the worker, shared by the Node, Go and Elixir clients' protocol edge-case tests (fast,
no model). A client test writes an executable script that puts this folder on sys.path, star-imports this module
and then runs its scenario, which uses:

    hello(**override)          the hello frame, with fields overridden
    recv()                     the next host message (exits at EOF)
    send(**message)            one message frame
    send_raw(body)             a frame holding any bytes
    respond(request, result)   an ok response to a request
    os, struct, sys, time      imported for the scenarios
"""

import os
import struct
import sys
import time

import msgpack

__all__ = ["hello", "recv", "send", "send_raw", "respond", "os", "struct", "sys", "time"]

_in, _out = sys.stdin.buffer, sys.stdout.buffer


def send_raw(body: bytes) -> None:
    _out.write(struct.pack(">I", len(body)) + body)
    _out.flush()


def send(**message: object) -> None:
    send_raw(msgpack.packb(message))


def recv() -> dict:
    head = _in.read(4)
    if len(head) < 4:
        sys.exit(0)
    return msgpack.unpackb(_in.read(struct.unpack(">I", head)[0]))


def hello(**override: object) -> None:
    send(**{"type": "hello", "protocol": 1, "server": "fake", "version": "0", "pid": os.getpid(),
            "pgid": os.getpgrp(), "max_frame_bytes": 1 << 26, "max_inflight": 8, "methods": ["ping"],
            "timeout_profiles": {"default": 120000, "streaming": 1800000, "ml_inference": 600000,
                                 "batch_job": 3600000}, **override})


def respond(request: dict, result: object = None) -> None:
    send(type="response", id=request["id"], ok=True, result={} if result is None else result)
