"""lmport.bridge.service in-process (no transport, no model): calls, deadlines, error mapping, the asyncio adapters."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import pytest

from lmport.bridge.protocol import BridgeError
from lmport.bridge.service import Call, Service, _Engine, engine_key
from lmport.engine.config import EngineConfig
from lmport.engine.errors import InvalidParams, ModelNotFound, OutOfKVCache
from lmport.engine.llm import EngineDead


def run_call(service: Service, method: str, params: dict | None = None, **options):
    outcome = {}
    done = threading.Event()

    def on_done(result, error):
        outcome.update(result=result, error=error)
        done.set()

    service.submit(Call("t", method, params or {}, on_done=on_done, **options))
    assert done.wait(10)
    return outcome["result"], outcome["error"]


def test_submit_answers_exactly_once_with_result_or_error():
    service = Service()
    result, error = run_call(service, "ping", {"n": 3})
    assert error is None and result["n"] == 3
    result, error = run_call(service, "ping", {"n": 3.5})
    assert result is None and error.code == "invalid_params" and error.details == {"field": "n"}
    _, error = run_call(service, "ping", stream=True)
    assert error.code == "invalid_request"
    _, error = run_call(service, "nope")
    assert error.code == "method_not_found"
    assert service.stats()["service"]["requests_total"] == 4


def test_an_unknown_handle_names_the_parameter_that_held_it():
    _, error = run_call(Service(), "release", {"ref": "llm-404"})
    assert error.code == "not_found" and error.details == {"field": "ref"}
    _, error = run_call(Service(), "tokenize", {"llm": "llm-404", "text": "x"})
    assert error.code == "not_found" and error.details == {"field": "llm"}


def test_a_call_past_its_deadline_answers_deadline_exceeded_and_a_late_result_is_dropped():
    service = Service()
    outcomes = []
    call = Call("slow", "ping", {}, timeout_ms=50, on_done=lambda r, e: outcomes.append((r, e)))
    call.received -= 1.0  # it waited a second to be admitted
    service.submit(call)
    assert len(outcomes) == 1 and outcomes[0][1].code == "deadline_exceeded"
    assert call.finish("late") is False and len(outcomes) == 1


def test_a_deadline_earlier_than_those_waiting_fires_on_time():
    service = Service()
    fired = threading.Event()
    late = Call("late", "ping", {}, on_done=lambda r, e: None)
    late.deadline = time.monotonic() + 60
    service._deadlines.add(late)  # the timer now sleeps for a minute
    soon = Call("soon", "ping", {}, timeout_ms=50, on_done=lambda r, e: fired.set())
    soon.deadline = time.monotonic() + 0.05
    service._deadlines.add(soon)
    assert fired.wait(2) and soon.cancel_error.code == "deadline_exceeded" and not late.done


def test_finished_calls_do_not_accumulate_in_the_deadline_heap():
    service = Service()
    for i in range(5000):
        run_call(service, "ping", {"n": i})
    assert len(service._deadlines._heap) < 3000


def test_cancel_before_any_engine_work_answers_at_once():
    service = Service()
    outcomes = []
    call = Call("c", "ping", {}, on_done=lambda r, e: outcomes.append(e))
    call.cancel()
    call.cancel()
    service.submit(call)  # already finished: nothing runs, nothing more is answered
    assert [e.code for e in outcomes] == ["cancelled"]
    # and it is not left counted as in flight
    assert service.inflight == 0 and service.stats()["service"]["inflight"] == 0
    assert service.health()["inflight"] == 0


def test_a_ping_error_does_not_import_the_engine():
    code = ("import sys; from lmport.bridge.service import Call, Service; out = []; "
            "Service().submit(Call(1, 'ping', {'n': 'x'}, on_done=lambda r, e: out.append(e))); "
            "assert out[0].code == 'invalid_params', out; print('lmport.engine.llm' in sys.modules, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("exc, code, field", [
    (InvalidParams("top_p", "must be in (0, 1]"), "invalid_params", "top_p"),
    (ModelNotFound("no model 'x'"), "not_found", "model"),
    (OutOfKVCache("too small"), "out_of_memory", None),
    (EngineDead("step failed"), "engine_error", None),
    (RuntimeError("boom"), "internal", None),
])
def test_exceptions_map_onto_error_codes(exc, code, field):
    try:
        raise exc
    except Exception as raised:  # noqa: BLE001
        error = Service(debug=True).to_bridge_error(raised)
        quiet = Service().to_bridge_error(raised)
    assert error.code == code and (error.details or {}).get("field") == field
    assert error.python_type == f"{type(exc).__module__}.{type(exc).__qualname__}"
    assert "Traceback" in error.traceback and "raise exc" in error.traceback
    assert quiet.traceback is None and quiet.python_type == error.python_type


def test_asyncio_adapters():
    async def main():
        service = Service()
        pong = await service.acall("ping", {"n": 4})
        with pytest.raises(BridgeError) as info:
            await service.acall("tokenize", {"llm": "llm-1", "text": "x"})
        stream = service.astream("generate", {"llm": "llm-1", "prompts": "x"})
        with pytest.raises(BridgeError) as streamed:
            async for _ in stream:
                pass
        return pong, info.value.code, streamed.value.code

    assert asyncio.run(main()) == ({"n": 4, "time": pytest.approx(0, abs=1e10)}, "not_found", "not_found")


class _FakeLLM:
    def __init__(self) -> None:
        self.shut_down = False

    def shutdown(self) -> None:
        self.shut_down = True


class _HookLock:
    """Service._lock that runs `hook` (once) right after the next time it is released."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hook = None

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *exc):
        self._lock.__exit__(*exc)
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()


def test_llm_reusing_an_engine_is_not_undone_by_a_concurrent_release():
    service = Service()
    options = EngineConfig.from_dict({}).to_dict()
    key = engine_key(options)
    entry = _Engine("engine-1", key, options, _FakeLLM(), {"model": "smollm2"}, refs={"llm-0"})
    service._engines[key] = entry
    service._refs["llm-0"] = entry
    service._lock = _HookLock()
    service._lock.hook = lambda: service.release("llm-0")  # the old handle's release lands inside llm()
    handle = service.llm()
    assert not entry.llm.shut_down and service.get_llm(handle) is entry.llm
    assert service._engines[key] is entry and entry.refs == {handle["ref"]}


def test_health_before_any_model_is_answered_without_importing_torch():
    code = ("import sys; from lmport.bridge.service import Service; health = Service().health(); "
            "print(health['device'], health['engines'], 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "[]", "False"]
