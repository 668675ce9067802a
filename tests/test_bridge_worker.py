"""The stdio worker as a real process over real pipes, without a model: handshake, bad input of every kind,
stdout protection and process lifecycle."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import msgpack
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmport.bridge import protocol, vectors
from tests.bridge_helpers import REPO, RawWorker, group_alive


@pytest.fixture(scope="module")
def worker():
    w = RawWorker("--max-frame-bytes", "65536")
    yield w
    w.close()


def assert_serving(worker: RawWorker, n: int = 1) -> None:
    reply = worker.call(f"alive-{n}-{time.monotonic_ns()}", "ping", {"n": n})
    assert reply["ok"] and reply["result"]["n"] == n


def test_hello_comes_first_and_describes_the_worker(worker):
    hello = worker.hello
    assert hello["protocol"] == 1 and hello["server"] == "lmport"
    assert hello["pid"] == worker.proc.pid and hello["pgid"] == worker.proc.pid  # setsid: its own group
    assert hello["max_frame_bytes"] == 65536 and hello["max_inflight"] == protocol.DEFAULT_MAX_INFLIGHT
    assert {"describe", "llm", "generate", "chat", "ping", "shutdown"} <= set(hello["methods"])
    assert hello["timeout_profiles"] == protocol.TIMEOUT_PROFILES


def test_ping_describe_and_health_without_a_model(worker):
    assert worker.call(1, "ping", {"n": 41})["result"]["n"] == 41
    manifest = worker.call(2, "describe")["result"]
    assert manifest["protocol"] == 1 and [m["name"] for m in manifest["methods"]] == worker.hello["methods"]
    health = worker.call(3, "health")["result"]
    assert health["status"] == "ok" and health["engines"] == [] and health["pid"] == worker.proc.pid


@pytest.mark.parametrize("vector", json.loads((vectors.VECTOR_DIR / "invalid.json").read_text())["vectors"],
                         ids=lambda v: v["name"])
def test_each_invalid_frame_is_answered_as_the_vector_says(worker, vector):
    worker.send(bytes.fromhex(vector["frame"]))
    if vector["expect"] == "response":
        reply = worker.response(vector["id"])
        assert not reply["ok"] and reply["error"]["code"] == vector["code"]
        assert set(reply["error"]) >= {"code", "message", "retryable"}
        if vector["code"] == "invalid_params":
            assert reply["error"]["details"]["field"]
    else:
        event, _ = worker.until(lambda m: m["type"] == "event")
        assert event["name"] == "protocol_error" and event["data"]["code"] == vector["code"]
    assert_serving(worker)


def test_oversize_frame_is_discarded_and_reported(worker):
    worker.send((200_000).to_bytes(4, "big") + os.urandom(200_000))
    event = worker.next()
    assert event["name"] == "protocol_error" and event["data"]["details"]["length"] == 200_000
    assert_serving(worker)


@pytest.fixture(scope="module")
def slow_worker():
    w = RawWorker("--preload", "tests.bridge_slow_method", "--max-inflight", "2")
    yield w
    w.close()


def test_duplicate_in_flight_id_is_reported_without_touching_the_original(slow_worker):
    slow_worker.request("dup", "sleep", {"seconds": 0.5})
    slow_worker.request("dup", "health")
    event = slow_worker.next()
    assert event["name"] == "protocol_error" and event["data"]["details"] == {"id": "dup"}
    reply = slow_worker.next()
    assert reply["id"] == "dup" and reply["result"] == {"slept": 0.5}


def test_overloaded_beyond_max_inflight_while_ping_still_answers(slow_worker):
    slow_worker.request(1, "sleep", {"seconds": 1.0})
    slow_worker.request(2, "sleep", {"seconds": 1.0})
    reply = slow_worker.call(3, "sleep", {"seconds": 0})
    assert reply["error"]["code"] == "overloaded" and reply["error"]["retryable"] is True
    start = time.monotonic()
    assert_serving(slow_worker)
    assert time.monotonic() - start < 0.5
    assert {slow_worker.response(1)["ok"], slow_worker.response(2)["ok"]} == {True}


def test_worker_enforces_deadlines_and_cancels(slow_worker):
    start = time.monotonic()
    reply = slow_worker.call(10, "sleep", {"seconds": 2}, timeout_ms=150)
    assert reply["error"]["code"] == "deadline_exceeded" and "timeout_ms=150" in reply["error"]["message"]
    assert time.monotonic() - start < 1.0
    slow_worker.request(11, "sleep", {"seconds": 2})
    slow_worker.send(protocol.cancel(11))
    slow_worker.send(protocol.cancel(12345))  # unknown ids are ignored
    assert slow_worker.response(11)["error"]["code"] == "cancelled"
    time.sleep(2.2)  # let both sleeps end: their late results must not be answered a second time
    slow_worker.request("after", "ping")
    _, before = slow_worker.until(lambda m: m.get("id") == "after")
    assert not [m for m in before if m.get("id") in (10, 11)]


_INT64 = st.integers(-(2**63), 2**64 - 1)
_VALUES = st.recursive(st.none() | st.booleans() | _INT64 | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                     max_size=4), max_leaves=12)
_ENVELOPES = st.fixed_dictionaries({
    "type": st.sampled_from(["request", "cancel", "response", "x"]),
    "id": st.integers(-5, 5) | st.text(max_size=4) | st.none(),
    "method": st.sampled_from(["ping", "describe", "health", "nope", "stats", "tokenize"]) | _INT64,
    "params": st.dictionaries(st.sampled_from(["n", "llm", "text", "x"]), _INT64 | st.text(max_size=4), max_size=2)
    | _INT64,
    "timeout_ms": st.integers(-3, 10**6)})
_FRAMES = st.one_of(st.binary(max_size=300), (_VALUES | _ENVELOPES).map(lambda v: msgpack.packb(v, use_bin_type=True)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_FRAMES)
def test_fuzzed_frames_never_break_the_worker(worker, payload):
    worker.send(len(payload).to_bytes(4, "big") + payload)
    marker = f"fuzz-{time.monotonic_ns()}"
    worker.request(marker, "ping")
    worker.response(marker)  # every frame before it was handled (answered or not) and it still serves


def test_unexpected_exceptions_are_internal_errors_with_a_traceback_under_debug(slow_worker):
    reply = slow_worker.call(20, "fail", {"message": "boom"})
    assert reply["error"]["code"] == "internal" and "boom" in reply["error"]["message"]
    assert reply["error"]["python_type"] == "builtins.RuntimeError" and "traceback" not in reply["error"]
    debug = RawWorker("--debug", "--preload", "tests.bridge_slow_method")
    try:
        error = debug.call(1, "fail", {"message": "boom"})["error"]
        assert "Traceback" in error["traceback"] and "RuntimeError: boom" in error["traceback"]
        assert_serving(debug)
    finally:
        debug.close()


def test_an_error_whose_details_cannot_be_encoded_is_still_answered():
    from lmport.bridge.service import Service
    from lmport.bridge.worker import Worker

    worker = Worker(-1, Service(), protocol.DEFAULT_MAX_FRAME_BYTES, protocol.DEFAULT_MAX_INFLIGHT, 1.0)
    worker._responder(7, "tokenize")(None, protocol.BridgeError("invalid_params", "bad", {"value": object()}))
    message = protocol.unpack(worker._out.get_nowait()[protocol.HEADER.size:])
    assert message["id"] == 7 and message["ok"] is False
    assert message["error"]["code"] == "internal" and "details" not in message["error"]
    assert "'invalid_params' error could not be encoded" in message["error"]["message"]


def test_timeout_profiles_are_overridable_by_flags():
    w = RawWorker("--timeout-profile", "default=1500", "--timeout-profile", "nightly=9000")
    try:
        assert w.hello["timeout_profiles"]["default"] == 1500 and w.hello["timeout_profiles"]["nightly"] == 9000
        assert w.call(1, "ping", timeout_profile="nightly")["ok"]
    finally:
        w.close()


@pytest.mark.parametrize("flag", ["--max-inflight", "--max-frame-bytes"])
def test_a_limit_below_1_is_refused_naming_the_flag(flag):
    run = subprocess.run([sys.executable, "-m", "lmport.bridge.worker", flag, "0"], cwd=REPO, stdin=subprocess.DEVNULL,
                         capture_output=True, timeout=60)
    assert run.returncode == 2 and f"{flag} must be > 0, got 0" in run.stderr.decode()
    assert run.stdout == b""  # no hello: it never started serving


def test_stray_prints_and_c_writes_to_fd1_do_not_corrupt_the_stream():
    w = RawWorker("--preload", "tests.bridge_noise")
    try:
        for i in range(200):  # the noise thread writes to fd 1 every 5 ms while frames flow
            assert_serving(w, i)
        assert w.call("d", "describe")["ok"]
        noise = w.stderr_text()
        for line in ("python print", "os.write(1)", "libc write(1)"):
            assert f"noise: {line}" in noise
    finally:
        w.close()


def test_random_bytes_then_eof_reports_and_exits_cleanly():
    w = RawWorker()
    w.send(b"\x00\x00\x00\x10" + b"\xc1" * 16 + b"\x00\x00\x01\x00partial")
    event = w.next()
    assert event["name"] == "protocol_error"
    w.proc.stdin.close()
    event, _ = w.until(lambda m: m["type"] == "event" and m["name"] == "protocol_error")
    assert "inside a frame" in event["data"]["message"]
    assert w.proc.wait(10) == 0
    w.close()


def test_stdin_close_exits_0_within_the_grace_and_kills_children():
    w = RawWorker("--grace", "2", "--preload", "tests.bridge_spawn_child")
    child = int(re.search(r"CHILD_PID=(\d+)", w.stderr_text()).group(1))
    start = time.monotonic()
    w.proc.stdin.close()
    assert w.proc.wait(10) == 0
    assert time.monotonic() - start < 3.0
    assert w.until(lambda m: m["type"] == "event")[0]["name"] == "shutting_down"
    assert not group_alive(w.hello["pgid"])
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    w.close()


def test_sigterm_is_an_orderly_exit():
    w = RawWorker()
    w.proc.send_signal(signal.SIGTERM)
    event = w.next()
    assert event["name"] == "shutting_down" and event["data"]["reason"] == "SIGTERM"
    assert w.proc.wait(10) == 0
    w.close()


def test_the_signal_handler_takes_no_lock_the_main_thread_may_hold():
    """Python runs a handler on the main thread between bytecodes, so it can land inside Event.wait's
    `with cond:` of the main loop; a handler that set the Event there would wait on that lock forever."""
    from lmport.bridge.service import Service
    from lmport.bridge.worker import Worker

    read_fd, write_fd = os.pipe()
    worker = Worker(write_fd, Service(), 1 << 20, 8, 1.0)

    def signal_inside_the_wait() -> None:
        with worker._stop._cond:  # where the main loop's Event.wait holds it
            worker._on_signal(signal.SIGTERM, None)

    thread = threading.Thread(target=signal_inside_the_wait, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "the handler blocked on the Event's lock"
    assert worker._signal_name == "SIGTERM"
    os.close(read_fd)
    os.close(write_fd)


def test_shutdown_request_answers_then_exits_0():
    w = RawWorker()
    reply = w.call(1, "shutdown")
    assert reply["ok"] and reply["result"] == {"shutting_down": True}
    assert w.proc.wait(10) == 0
    w.close()


HOST_SCRIPT = textwrap.dedent("""
    import subprocess, sys, time
    proc = subprocess.Popen([sys.executable, "-m", "lmport.bridge.worker", "--preload", "tests.bridge_spawn_child"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    proc.stdout.read(4)  # the hello's header: the worker is up
    print(proc.pid, flush=True)
    time.sleep(600)
""")


def test_sigkill_of_the_host_leaves_no_worker_process_behind():
    host = subprocess.Popen([sys.executable, "-c", HOST_SCRIPT], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    worker_pid = int(host.stdout.readline())
    pgid = os.getpgid(worker_pid)
    assert pgid == worker_pid and group_alive(pgid)
    host.kill()
    host.wait()
    end = time.monotonic() + 5
    while group_alive(pgid) and time.monotonic() < end:
        time.sleep(0.1)
    assert not group_alive(pgid), "worker processes outlived their host by more than 5 s"


PDEATHSIG_HOST = textwrap.dedent("""
    import os, subprocess, sys, time
    stdin_fd = int(sys.argv[1])  # the test holds this pipe's write end open: stdin never reaches EOF
    proc = subprocess.Popen([sys.executable, "-m", "lmport.bridge.worker"], stdin=stdin_fd, stdout=subprocess.PIPE)
    proc.stdout.read(4)
    print(proc.pid, flush=True)
    time.sleep(600)
""")


def test_parent_death_alone_stops_the_worker():
    read_end, write_end = os.pipe()
    try:
        host = subprocess.Popen([sys.executable, "-c", PDEATHSIG_HOST, str(read_end)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, pass_fds=(read_end,))
        os.close(read_end)
        worker_pid = int(host.stdout.readline())
        host.kill()
        host.wait()
        end = time.monotonic() + 5
        while group_alive(worker_pid) and time.monotonic() < end:
            time.sleep(0.1)
        assert not group_alive(worker_pid), "the worker outlived its parent although its stdin stayed open"
    finally:
        os.close(write_end)


SLOW_PRELOAD_HOST = textwrap.dedent("""
    import subprocess, sys, time
    stdin_fd, stdout_fd = int(sys.argv[1]), int(sys.argv[2])  # the test holds the other ends: no EOF, no EPIPE
    proc = subprocess.Popen([sys.executable, "-m", "lmport.bridge.worker", "--preload", "slow_preload"], stdin=stdin_fd,
                            stdout=stdout_fd)
    print(proc.pid, flush=True)
    time.sleep(600)
""")


def test_a_parent_dying_during_preload_still_stops_the_worker(tmp_path):
    marker = tmp_path / "preloading"
    (tmp_path / "slow_preload.py").write_text(f"import time\nopen({str(marker)!r}, 'w').close()\ntime.sleep(3)\n")
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()
    worker = None
    try:
        host = subprocess.Popen([sys.executable, "-c", SLOW_PRELOAD_HOST, str(stdin_read), str(stdout_write)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                pass_fds=(stdin_read, stdout_write), env={**os.environ, "PYTHONPATH": str(tmp_path)})
        os.close(stdin_read)
        os.close(stdout_write)
        worker = psutil.Process(int(host.stdout.readline()))
        end = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < end:
            time.sleep(0.05)
        assert marker.exists(), "the worker never reached its preload"
        host.kill()  # while the worker sits in its preload
        host.wait()
        try:
            worker.wait(8)  # the preload takes 3 s; the watchdog then notices within a second
        except psutil.TimeoutExpired:
            pytest.fail("the worker outlived a parent that died during --preload")
    finally:
        if worker is not None and worker.is_running():
            worker.kill()
        os.close(stdin_write)
        os.close(stdout_read)
