"""The Python shim against a real worker (no model): calls, errors, close, client-side deadlines, worker death."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
import tempfile
import time

import pytest

from lmport.bridge import protocol
from lmport.bridge.client import AsyncClient, Client
from lmport.bridge.protocol import BridgeError
from tests.bridge_helpers import REPO, group_alive


def spawn(**options) -> Client:
    return Client.spawn(cwd=str(REPO), stderr=tempfile.TemporaryFile(), **options)


def test_calls_return_plain_data_and_errors_raise_with_their_code():
    with spawn() as client:
        assert client.hello["protocol"] == 1 and client.ping(9)["n"] == 9
        assert client.describe()["server"] == "lmport"
        assert client.health()["engines"] == []
        with pytest.raises(BridgeError) as info:
            client.call("no_such_method")
        assert info.value.code == "method_not_found" and not info.value.retryable
        with pytest.raises(BridgeError) as info:
            client.stats("llm-1")
        assert info.value.code == "not_found" and info.value.details == {"field": "llm"}


def test_close_shuts_the_worker_down_and_leaves_no_process_of_its_group():
    client = spawn()
    pgid = client.hello["pgid"]
    assert client.close() == 0
    assert not group_alive(pgid)


def test_many_threads_share_one_client():
    import threading

    with spawn() as client:
        seen: list[int] = []
        threads = [threading.Thread(target=lambda i=i: seen.append(client.ping(i)["n"])) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(seen) == list(range(50))


def test_client_side_deadline_cancels_and_kills_a_wedged_worker():
    client = spawn(deadline_grace=0.3)
    os.kill(client.process.pid, signal.SIGSTOP)  # wedged: alive but answering nothing
    start = time.monotonic()
    with pytest.raises(BridgeError) as info:
        client.ping(timeout=0.2)
    assert info.value.code == "deadline_exceeded" and info.value.details == {"client_side": True}
    assert time.monotonic() - start < 5.0
    assert client.process.wait(5) is not None and not group_alive(client.hello["pgid"])
    with pytest.raises(BridgeError) as info:
        client.ping()
    assert info.value.code == "worker_exited"


def test_a_worker_killed_mid_call_fails_pending_callers_with_worker_exited():
    client = spawn()
    stream = client.generate("llm-1", "x", stream=True)  # answered not_found, but we kill first
    os.kill(client.process.pid, signal.SIGKILL)
    with pytest.raises(BridgeError) as info:
        for _ in stream:
            pass
    assert info.value.code in ("worker_exited", "not_found")
    with pytest.raises(BridgeError) as info:
        client.ping()
    assert info.value.code == "worker_exited"
    client.close()


def test_a_worker_speaking_another_protocol_version_is_refused(tmp_path):
    fake = tmp_path / "fake-python"
    hello = protocol.pack({"type": "hello", "protocol": 2, "server": "other"})
    fake.write_text(f"#!{sys.executable}\nimport os, time\nos.write(1, {hello!r})\ntime.sleep(30)\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(BridgeError) as info:
        Client.spawn(python=str(fake))
    assert info.value.code == "protocol_mismatch"


def test_a_worker_that_cannot_start_or_exits_before_hello_is_spawn_failed(tmp_path):
    with pytest.raises(BridgeError) as info:
        Client.spawn(python=str(tmp_path / "no-such-python"))
    assert info.value.code == "spawn_failed" and "no-such-python" in info.value.message
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\nraise SystemExit(3)\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(BridgeError) as info:
        Client.spawn(python=str(fake))
    assert info.value.code == "spawn_failed" and "before its hello" in info.value.message


def test_an_undecodable_frame_fails_pending_calls_with_protocol_error_and_kills_the_worker(tmp_path):
    fake = tmp_path / "fake-python"
    hello = protocol.pack({"type": "hello", "protocol": 1, "server": "fake", "timeout_profiles": {"default": 60000}})
    garbage = protocol.HEADER.pack(1) + b"\xc1"  # 0xc1 is never valid msgpack
    fake.write_text(f"#!{sys.executable}\nimport os, time\nos.write(1, {hello!r})\nos.read(0, 1 << 16)\n"
                    f"os.write(1, {garbage!r})\ntime.sleep(30)\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    client = Client.spawn(python=str(fake), deadline_grace=1)
    start = time.monotonic()
    with pytest.raises(BridgeError) as info:
        client.ping(timeout=3)  # the fake answers it with garbage
    assert info.value.code == "protocol_error" and time.monotonic() - start < 3
    assert client.process.wait(5) is not None
    with pytest.raises(BridgeError) as info:
        client.ping()
    assert info.value.code == "protocol_error"
    client.close()


def test_async_client_gathers_calls_and_closes():
    async def main() -> tuple[list[int], int | None]:
        client = await AsyncClient.spawn(cwd=str(REPO), stderr=tempfile.TemporaryFile())
        async with client:
            results = await asyncio.gather(*(client.ping(i) for i in range(20)))
            with pytest.raises(BridgeError):
                await client.call("nope")
        return [r["n"] for r in results], client.process.poll()

    numbers, code = asyncio.run(main())
    assert numbers == list(range(20)) and code == 0


def test_bench_bridge_reports_latency_and_rate(capsys):
    import argparse
    import json

    from lmport.bridge import bench_bridge

    parser = argparse.ArgumentParser()
    bench_bridge.add_arguments(parser)
    args = parser.parse_args(["--skip-engine", "--pings", "50", "--rate-seconds", "0.3", "--rate-threads", "2",
                              "--json"])
    assert bench_bridge.run(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 < result["ping"]["p50_ms"] <= result["ping"]["p99_ms"]
    assert result["rate"]["requests"] > 0 and result["rate"]["requests_per_s"] > 0
