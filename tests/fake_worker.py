"""A scripted stand-in for the worker, shared by the Node, Go and Elixir clients' protocol edge-case tests (fast,
no model). A client test writes an executable script that puts this folder on sys.path, star-imports this module
and then runs its scenario, which uses:

    hello(**override)          the hello frame, with fields overridden
    recv()                     the next host message (exits at EOF)
    send(**message)            one message frame
    send_raw(body)             a frame holding any bytes
    respond(request, result)   an ok response to a request
    refuse_if_first(lock, err) a pool's fakes: the first to start answers every request with the error map `err`
    os, struct, sys, time      imported for the scenarios
"""

import os
import struct
import sys
import time

import msgpack

__all__ = ["hello", "recv", "send", "send_raw", "respond", "refuse_if_first", "os", "struct", "sys", "time"]

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


def refuse_if_first(lock_path: str, error: dict) -> None:
    """For pool tests: of the fakes started with the same `lock_path`, the first to start answers every request
    with `error` (and appends a line to `lock_path` for each); the others answer `{"pid": <their pid>}`."""
    try:
        os.close(os.open(lock_path, os.O_CREAT | os.O_EXCL))
        refuse = True
    except FileExistsError:
        refuse = False
    hello()
    while True:
        request = recv()
        if refuse:
            with open(lock_path, "a") as log:
                log.write(f"{request.get('method')}\n")
            send(type="response", id=request["id"], ok=False, error=error)
        else:
            respond(request, {"pid": os.getpid()})
