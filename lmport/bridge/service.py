"""The bridge's methods, independent of any transport (the stdio worker and the HTTP server both serve them).

API for a transport:

    service = Service(timeout_profiles=None, debug=False)
    call = Call(id, "generate", params, stream=True, timeout_ms=None, timeout_profile=None,
                on_chunk=lambda data: ..., on_done=lambda result, error: ...)
    service.submit(call)   # blocking admission (loads a model, tokenizes): run it off your I/O thread; returns
                           # once the work is queued in the engine. Never raises: every outcome goes to on_done.
    call.cancel()          # idempotent; the engine aborts the call's requests, then on_done(None, BridgeError
                           # ("cancelled", details={"usage": ...})). A deadline does the same with deadline_exceeded.
    service.ping(n)        # pure, never waits for the engine
    await service.acall("tokenize", {...})            # asyncio adapters over the same path
    async for data in service.astream("chat", {...})  # chunk data; stream.summary when done; leaving early cancels
    service.get_llm(handle) -> engine.LLM             # for a transport that drives the engine itself
    release = service.hold(handle)                    # keep its engine loaded (loading it if keep_alive unloaded
                                                      # it) until release(); a transport's request spanning calls
    service.on_event = fn(name, data)                 # events that belong to no request (model_loaded)
    service.close()        # answer everything in flight with shutting_down, unload every engine

Callbacks: on_chunk(data) is called in order, never after on_done; on_done(result, error) exactly once. They may
run on the engine's thread, so they must only hand the data over (enqueue), never block.

Each RPC method below is a plain method decorated with @rpc; its signature, type hints and docstring (Args: /
Returns: sections) are the single source of the manifest (lmport/bridge/manifest.py) and of parameter validation here.
The engine is imported lazily so that a worker says hello and answers ping before torch is loaded.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import itertools
import os
import re
import threading
import time
import traceback
import typing
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmport.bridge import footprint
from lmport.bridge.budget import Resident, evictions
from lmport.bridge.footprint import Footprint
from lmport.bridge.protocol import TIMEOUT_PROFILES, BridgeError, Handle, matches_type, type_string
from lmport.bridge.reaper import Reaper

if TYPE_CHECKING:
    from lmport.engine.tool_calls import ToolCalling

VERSION = "0.1.0"


# --- method registry: the manifest and the parameter checks both read it ---

@dataclass(slots=True)
class ParamSpec:
    name: str
    type: str
    required: bool
    default: Any
    doc: str


@dataclass(slots=True)
class MethodSpec:
    name: str
    func: Callable[..., Any]
    timeout_profile: str
    streaming: bool  # generation methods: take the Call first, stream chunks when asked, finish asynchronously
    deferred: bool  # take the Call first and finish it asynchronously, without streaming (embed)
    options: str | None  # "EngineOptions" / "SamplingParams": **kwargs are that schema's fields
    shapes: dict[str, str]  # result type expressions over lmport.bridge.results' records: "result", "chunk", "summary"
    doc: str = ""
    holds_engine: bool = False  # the call keeps its `llm` handle's engine loaded (reloading it first) while it runs
    returns: dict[str, str] = field(default_factory=dict)
    params: list[ParamSpec] = field(default_factory=list)


METHODS: dict[str, MethodSpec] = {}


def rpc(timeout_profile: str = "default", *, streaming: bool = False, deferred: bool = False,
        options: str | None = None, holds_engine: bool = False,
        **shapes: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a method; `shapes` (result=, chunk=, summary=) name its result shapes in lmport.bridge.results."""
    def register(func: Callable[..., Any]) -> Callable[..., Any]:
        METHODS[func.__name__] = MethodSpec(func.__name__, func, timeout_profile, streaming, deferred, options,
                                            shapes, holds_engine=holds_engine)
        return func
    return register


def method_specs() -> dict[str, MethodSpec]:
    """The registry with signatures and docstrings parsed (once)."""
    for spec in METHODS.values():
        if spec.doc:
            continue
        doc, arg_docs, returns_doc = _parse_docstring(inspect.getdoc(spec.func) or "")
        hints = typing.get_type_hints(spec.func)
        signature = inspect.signature(spec.func)
        skip = 2 if spec.streaming or spec.deferred else 1  # self (and the Call)
        spec.params = [ParamSpec(p.name, type_string(hints[p.name]), p.default is inspect.Parameter.empty,
                                 None if p.default is inspect.Parameter.empty else p.default, arg_docs.get(p.name, ""))
                       for p in list(signature.parameters.values())[skip:] if p.kind is not p.VAR_KEYWORD]
        spec.returns = {"type": type_string(hints["return"]), "doc": returns_doc, **spec.shapes}
        spec.doc = doc
    return METHODS


def _parse_docstring(text: str) -> tuple[str, dict[str, str], str]:
    """Google style: summary paragraphs, then "Args:" (name: doc, indented continuations) and "Returns:"."""
    parts = re.split(r"^(Args|Returns):\s*$", text, flags=re.M)
    summary, args, returns = parts[0].strip(), {}, ""
    for title, body in zip(parts[1::2], parts[2::2]):
        if title == "Returns":
            returns = " ".join(body.split())
            continue
        for match in re.finditer(r"^\s{0,8}(\w+): (.*(?:\n\s{6,}.*)*)", body, flags=re.M):
            args[match.group(1)] = " ".join(match.group(2).split())
    return " ".join(summary.split("\n\n")[0].split()) if summary else "", args, returns


# --- one request as the service sees it ---

class Call:
    """One in-flight request; the transport creates it and gets its chunks and its one outcome through callbacks."""

    def __init__(self, id: int | str, method: str, params: dict[str, Any], *, stream: bool = False,
                 timeout_ms: int | None = None, timeout_profile: str | None = None,
                 on_chunk: Callable[[Any], None] | None = None,
                 on_done: Callable[[Any, BridgeError | None], None]) -> None:
        self.id = id
        self.method = method
        self.params = params
        self.stream = stream
        self.timeout_ms = timeout_ms
        self.timeout_profile = timeout_profile
        self.on_chunk = on_chunk
        self.on_done = on_done
        self.received = time.monotonic()
        self.deadline: float | None = None
        self._lock = threading.Lock()
        self._done = False
        self._cancel: BridgeError | None = None
        self._abort: Callable[[], None] | None = None

    @property
    def done(self) -> bool:
        return self._done

    @property
    def cancel_error(self) -> BridgeError | None:
        return self._cancel

    def emit(self, data: Any) -> None:
        with self._lock:  # chunks are handed over under the lock, so none can follow the outcome
            if not self._done and self._cancel is None and self.on_chunk is not None:
                self.on_chunk(data)

    def finish(self, result: Any = None, error: BridgeError | None = None) -> bool:
        """Deliver the outcome; False (and nothing delivered) when the call already finished."""
        with self._lock:
            if self._done:
                return False
            self._done = True
            # the deadline heap keeps finished calls a while: they must not keep an unloaded engine's memory alive
            self._abort = None
        self.on_done(result, error)
        return True

    def cancel(self, code: str = "cancelled", message: str = "the request was cancelled") -> None:
        """Idempotent. Engine work is aborted and the call answers once the engine confirms (with partial usage);
        a call with no engine work answers at once and its late result is dropped."""
        with self._lock:
            if self._done or self._cancel is not None:
                return
            self._cancel = BridgeError(code, message)
            abort = self._abort
        if abort is None:
            self.finish(error=self._cancel)
        else:
            abort()

    def set_abort(self, abort: Callable[[], None]) -> None:
        """Register how to abort the engine work; runs it at once if the call was already cancelled."""
        with self._lock:
            self._abort = abort
            late = self._cancel is not None or self._done
        if late:
            abort()


class _Deadlines:
    """One timer thread for every call's deadline: a heap from which finished calls are swept in bulk
    (amortized O(1) per call) so that a flood of quick calls (pings) cannot grow it."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Call]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._finished = 0  # finished calls possibly still in the heap

    def finished(self) -> None:
        with self._cond:
            self._finished += 1
            if self._finished > 1024 and self._finished * 2 > len(self._heap):
                self._heap = [entry for entry in self._heap if not entry[2].done]
                heapq.heapify(self._heap)
                self._finished = 0

    def add(self, call: Call) -> None:
        assert call.deadline is not None
        with self._cond:
            heapq.heappush(self._heap, (call.deadline, next(self._order), call))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lmport-deadlines", daemon=True)
                self._thread.start()
            if self._heap[0][2] is call:  # the timer sleeps until the earliest deadline: wake it only if that moved
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, call = heapq.heappop(self._heap)
            if not call.done:
                limit = f"timeout_ms={call.timeout_ms}" if call.timeout_ms else \
                    f"timeout_profile={call.timeout_profile or 'the method default'}"
                call.cancel("deadline_exceeded", f"the request ran past its deadline ({limit}) and was aborted")


@dataclass(slots=True)
class _Engine:
    id: str
    key: str
    options: dict[str, Any]  # EngineConfig fields, to load it again after keep_alive unloaded it
    llm: Any | None  # engine.LLM; None while unloaded (its handles stay valid)
    info: dict[str, Any]
    keep_alive: float | None = None  # seconds idle before unloading; None or negative: never
    refs: set[str] = field(default_factory=set)
    calls: set[Call] = field(default_factory=set)
    holds: int = 0  # calls in flight and transport holds: while any, it is never unloaded
    idle_since: float = field(default_factory=time.monotonic)
    footprint: Footprint | None = None  # measured at its last load
    loads: int = 0

    @property
    def expires(self) -> float | None:
        """When keep_alive unloads it (monotonic), if it is loaded, idle and has a keep_alive."""
        if self.llm is None or self.holds or self.keep_alive is None or self.keep_alive < 0:
            return None
        return self.idle_since + self.keep_alive

    def residency(self) -> dict[str, Any]:
        """What stats and health report about its loading."""
        return {"loaded": self.llm is not None, "keep_alive": self.keep_alive, "loads": self.loads,
                "memory_bytes": self.footprint.total if self.llm is not None and self.footprint else 0}


class Service:
    def __init__(self, timeout_profiles: dict[str, int] | None = None, debug: bool = False,
                 memory_budget_bytes: int | None = None) -> None:
        """memory_budget_bytes: the most that loaded engines may hold together (weights + KV cache); a load that
        would pass it unloads idle engines (least recently used first) or is refused, memory_budget_exceeded."""
        self.timeout_profiles = {**TIMEOUT_PROFILES, **(timeout_profiles or {})}
        self.debug = debug
        self.memory_budget_bytes = memory_budget_bytes
        self.on_event: Callable[[str, Any], None] = lambda name, data: None
        self.started = time.time()
        self._lock = threading.Lock()
        self._load_lock = threading.RLock()  # loads and unloads are serialized: they share the memory (budget)
        self._engines: dict[str, _Engine] = {}
        self._refs: dict[str, _Engine] = {}
        self._active: set[Call] = set()
        self._ref_ids = itertools.count(1)
        self._engine_ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self._deadlines = _Deadlines()
        self._counters: Counter[str] = Counter()
        self._closing = False
        self._manifest: dict[str, Any] | None = None
        self._reaper = Reaper(self._unload_expired)

    # --- the transport-facing entry points ---

    def submit(self, call: Call) -> None:
        """Validate and start a call (blocking admission). Its outcome always arrives through call.on_done."""
        on_done = call.on_done
        releases: list[Callable[[], None]] = []  # the engine hold of a holds_engine call, let go when it finishes

        def finished(result: Any, error: BridgeError | None) -> None:
            with self._lock:
                self._active.discard(call)
                self._counters["requests_ok" if error is None else f"errors.{error.code}"] += 1
            self._deadlines.finished()
            for release in releases:
                release()
            on_done(result, error)

        call.on_done = finished
        with self._lock:
            # Cancelled while it waited for admission: it has had its answer (through the old on_done, which
            # would never discard it from _active). Checked under the lock after the swap, so a cancel that
            # finishes from now on goes through `finished` and its discard follows this add.
            if call.done:
                return
            self._active.add(call)
            self._counters["requests_total"] += 1
        try:
            spec = method_specs().get(call.method)
            if spec is None:
                raise BridgeError("method_not_found", f"no method {call.method!r}; methods: {', '.join(METHODS)}")
            if self._closing and call.method != "shutdown":
                raise BridgeError("shutting_down", "the worker is shutting down")
            if call.stream and not spec.streaming:
                raise BridgeError("invalid_request", f"method {call.method!r} does not stream")
            self._start_deadline(call, spec)
            if call.done:  # its deadline passed while it waited to be admitted
                return
            kwargs = _bind(spec, call.params)
            if spec.holds_engine:
                releases.append(self.hold(kwargs["llm"]))
                if call.done:  # finished (cancelled) while the engine loaded: `finished` may have run before
                    releases[0]()
                    return
            if spec.streaming or spec.deferred:
                spec.func(self, call, **kwargs)
                return
            result = spec.func(self, **kwargs)
            if not call.finish(result) and call.method == "llm":
                self.release(result["ref"])  # nobody will ever see this handle
        except Exception as exc:  # noqa: BLE001 — every failure becomes the call's one error response
            call.finish(error=self.to_bridge_error(exc))

    def _start_deadline(self, call: Call, spec: MethodSpec) -> None:
        profile = call.timeout_profile or ("streaming" if call.stream else spec.timeout_profile)
        timeout_ms = call.timeout_ms if call.timeout_ms is not None else self.timeout_profiles[profile]
        call.timeout_profile = profile
        call.deadline = call.received + timeout_ms / 1000
        if call.deadline <= time.monotonic():  # it waited out its whole budget before admission
            call.cancel("deadline_exceeded", f"the request ran past its deadline ({timeout_ms} ms) before it started")
            return
        self._deadlines.add(call)

    def to_bridge_error(self, exc: BaseException) -> BridgeError:
        """Map any exception onto a protocol error: `to_bridge_error` with this service's debug setting."""
        return to_bridge_error(exc, debug=self.debug)

    async def acall(self, method: str, params: dict[str, Any] | None = None, *, timeout_ms: int | None = None,
                    timeout_profile: str | None = None) -> Any:
        """Run one call from asyncio; cancelling the awaiting task cancels the call."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        call = Call(f"async-{next(self._request_ids)}", method, params or {}, timeout_ms=timeout_ms,
                    timeout_profile=timeout_profile,
                    on_done=lambda result, error: loop.call_soon_threadsafe(_settle, future, result, error))
        try:
            await loop.run_in_executor(None, self.submit, call)
            return await future
        except asyncio.CancelledError:
            call.cancel()
            raise

    def astream(self, method: str, params: dict[str, Any] | None = None, *, timeout_ms: int | None = None,
                timeout_profile: str | None = None) -> ServiceStream:
        """Stream a generation from asyncio: `async for data in stream`, then `stream.summary`."""
        return ServiceStream(self, method, params or {}, timeout_ms, timeout_profile)

    def close(self, grace: float = 5.0) -> None:
        """Stop: everything in flight answers shutting_down (engine work aborted first), then engines unload."""
        with self._lock:
            self._closing = True
            active = list(self._active)
        for call in active:
            call.cancel("shutting_down", "the worker is shutting down")
        end = time.monotonic() + grace
        while time.monotonic() < end and any(not c.done for c in active):
            time.sleep(0.01)
        for call in active:
            call.finish(error=BridgeError("shutting_down", "the worker is shutting down"))
        self._reaper.close()
        with self._lock:
            engines, self._engines, self._refs = list(self._engines.values()), {}, {}
        for entry in engines:
            if entry.llm is not None:
                entry.llm.shutdown()

    def get_llm(self, handle: Handle | str) -> Any:
        """The engine.LLM behind a handle (map or ref string), loaded again if keep_alive unloaded it; not_found if
        unknown. Use hold() to keep it loaded while using it."""
        entry = self._entry(handle)
        self._load(entry)
        return entry.llm

    def hold(self, handle: Handle | str, field: str = "llm") -> Callable[[], None]:
        """Keep the handle's engine loaded until the returned release() (idempotent) is called, loading it first
        if keep_alive unloaded it (memory_budget_exceeded when it cannot fit). keep_alive counts from the moment
        the last hold on an engine is released."""
        entry = self._entry(handle, field)
        with self._lock:
            entry.holds += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                entry.holds -= 1
                if entry.holds == 0:
                    entry.idle_since = time.monotonic()
            self._reaper.wake()

        try:
            self._load(entry)
        except BaseException:
            release()
            raise
        return release

    @property
    def inflight(self) -> int:
        return len(self._active)

    # --- the methods ---

    @rpc()
    def describe(self) -> dict:
        """The manifest: every method with its parameters, the option schemas, error codes and timeout profiles.

        Returns:
            The manifest map (protocol, server, version, methods, schemas, error_codes, timeout_profiles).
        """
        if self._manifest is None:
            from lmport.bridge.manifest import build_manifest
            self._manifest = build_manifest(self.timeout_profiles)
        return self._manifest

    @rpc("ml_inference", options="EngineOptions")
    def llm(self, **options: Any) -> Handle:
        """Load a model (or reuse the engine already loaded with the same options) and return a handle to it.

        Args:
            options: engine options (see schemas.EngineOptions); all optional, model defaults to "smollm2".
        Returns:
            A handle {ref, engine, model, model_path, dtype, device, max_model_len, num_kv_blocks, block_size,
            max_num_seqs, max_concurrency, config}; max_concurrency is how many max_model_len-token requests the
            KV cache holds at once.
        """
        from lmport.engine.config import EngineConfig

        config = EngineConfig.from_dict(options).to_dict()
        key = engine_key(config)
        with self._load_lock:
            with self._lock:  # lookup and ref in one step: a release() in between could unload the engine
                entry = self._engines.get(key)
                if entry is not None:
                    entry.keep_alive = config["keep_alive"]
                    ref = self._add_ref(entry)
            if entry is None:
                entry = _Engine(f"engine-{next(self._engine_ids)}", key, config, None, {},
                                keep_alive=config["keep_alive"])
                self._load(entry)  # a failed load registers nothing
                with self._lock:
                    self._engines[key] = entry
                    ref = self._add_ref(entry)
            else:
                try:
                    self._load(entry)  # keep_alive or the memory budget may have unloaded it
                except BaseException:
                    self.release(ref)
                    raise
        self._reaper.wake()
        return {"ref": ref, "engine": entry.id, **entry.info}  # type: ignore[return-value]

    def _load(self, entry: _Engine) -> None:
        """Load the engine if it is not (first use, or keep_alive unloaded it), within the memory budget. Loads and
        unloads are serialized by _load_lock, so the budget sees one change at a time."""
        if entry.llm is not None:
            return
        from lmport.engine.config import EngineConfig
        from lmport.engine.llm import LLM

        with self._load_lock:
            if entry.llm is not None:
                return
            if self.memory_budget_bytes is not None:
                self._make_room(entry, entry.footprint or footprint.estimate(entry.options))
            llm = LLM(**entry.options)
            info = _engine_info(llm, EngineConfig.from_dict(entry.options))
            with self._lock:
                entry.llm, entry.info, entry.footprint = llm, info, footprint.measure(llm)
                entry.loads += 1
                entry.idle_since = time.monotonic()
        self.on_event("model_loaded", {"engine": entry.id, **entry.info})

    def _make_room(self, entry: _Engine, need: Footprint) -> None:
        """Unload idle engines (least recently used first) until `need` fits the budget; refused with the numbers
        when it cannot. The caller holds _load_lock."""
        assert self.memory_budget_bytes is not None
        with self._lock:
            loaded = [Resident(e, e.info.get("model", e.options["model"]), e.footprint.total if e.footprint else 0,
                               e.holds > 0, e.idle_since)
                      for e in self._engines.values() if e.llm is not None and e is not entry]
        for resident in evictions(entry.options["model"], need, self.memory_budget_bytes, loaded):
            self._unload(resident.engine, "memory_budget", lambda e: e.holds == 0)

    def _unload_expired(self) -> float | None:
        """The reaper's sweep: unload every engine idle past its keep_alive; returns the next expiry."""
        now = time.monotonic()
        with self._lock:
            expiries = [(e.expires, e) for e in self._engines.values() if e.expires is not None]
        for expires, entry in expiries:
            if expires <= now:
                self._unload(entry, "keep_alive", lambda e: e.expires is not None and e.expires <= time.monotonic())
        with self._lock:
            upcoming = [e.expires for e in self._engines.values() if e.expires is not None]
        return min(upcoming, default=None)

    def _unload(self, entry: _Engine, reason: str, still: Callable[[_Engine], bool]) -> None:
        """Shut the engine down and free its memory if `still(entry)` holds once the locks are taken (a call may have
        arrived meanwhile); its handles stay valid and the next call loads it again."""
        with self._load_lock:
            with self._lock:
                if entry.llm is None or not still(entry):
                    return
                llm, entry.llm = entry.llm, None
            llm.shutdown()
        self.on_event("model_unloaded", {"engine": entry.id, "model": entry.info.get("model"), "reason": reason})

    def _add_ref(self, entry: _Engine) -> str:
        """A new handle to the engine; the caller holds self._lock."""
        ref = f"llm-{next(self._ref_ids)}"
        entry.refs.add(ref)
        self._refs[ref] = entry
        return ref

    @rpc(options="SamplingParams")
    def sampling_params(self, **fields: Any) -> dict:
        """Validate sampling parameters and return them normalized, with every default filled in.

        Args:
            fields: SamplingParams fields (see schemas.SamplingParams); all optional.
        Returns:
            Every SamplingParams field as plain data (logit_bias keys as strings, output_kind as its value).
        """
        from lmport.engine.sampling_params import SamplingParams

        data = SamplingParams.from_dict(fields).to_dict()
        if data["logit_bias"] is not None:  # map keys on the wire are strings
            data["logit_bias"] = {str(k): v for k, v in data["logit_bias"].items()}
        return data

    @rpc("ml_inference", streaming=True, holds_engine=True, result="list[RequestOutput]", chunk="Chunk",
         summary="Summary")
    def generate(self, call: Call, llm: Handle, prompts: str | list[str] | list[int] | dict | list[dict],
                 sampling_params: dict | list[dict] | None = None,
                 lora_request: dict | list[dict | None] | None = None) -> list[dict]:
        """Generate completions for one prompt or many; all of them (and every other caller's) batch together.

        Args:
            llm: the LLM handle (map or ref string).
            prompts: a string, a list of strings, one token-id list, a {prompt_token_ids} map, or a list of maps.
            sampling_params: one map of SamplingParams fields for every prompt, or a list with one per prompt.
            lora_request: a LoRA adapter ({lora_name, lora_int_id, lora_path: a PEFT adapter directory}) for every
                  prompt, or a list with one (or null) each; the engine needs enable_lora.
        Returns:
            One RequestOutput per prompt, in order. With stream: each chunk is a Chunk (one request's delta)
            and the response a Summary (usage, and per request its metrics and how each completion ended).
        """
        entry = self._entry(llm)
        self._start_generation(call, entry, _prompt_list(prompts), sampling_params, lora_request=lora_request)

    @rpc("ml_inference", streaming=True, holds_engine=True, result="list[RequestOutput]", chunk="Chunk",
         summary="Summary")
    def chat(self, call: Call, llm: Handle, messages: list[dict] | list, sampling_params: dict | list[dict] | None
             = None, chat_template: str | None = None, add_generation_prompt: bool = True,
             tools: list[dict] | None = None, tool_choice: str | dict | None = None,
             lora_request: dict | list[dict | None] | None = None) -> list[dict]:
        """Generate replies to one conversation or many, through the model's chat template.

        Args:
            llm: the LLM handle (map or ref string).
            messages: one conversation (a list of {role, content} maps) or a list of conversations.
            sampling_params: one map of SamplingParams fields for every conversation, or a list with one each.
            chat_template: a Jinja template to use instead of the tokenizer's own.
            add_generation_prompt: end the prompt with the assistant turn's opening.
            tools: OpenAI function tools ({type: 'function', function: {name, description, parameters}}),
                  rendered by the chat template; each completion's calls come back in its tool_calls.
            tool_choice: 'auto' (the default with tools: calls parsed from the text), 'none', 'required' (the
                  output is constrained to calls of the declared tools) or {type: 'function', function: {name}}
                  (constrained to that tool's parameters schema).
            lora_request: a LoRA adapter ({lora_name, lora_int_id, lora_path: a PEFT adapter directory}) for every
                  conversation, or a list with one (or null) each; the engine needs enable_lora.
        Returns:
            Like generate: one RequestOutput per conversation (prompt is null; prompt_token_ids is the
            templated prompt), or Chunks and a Summary when streaming.
        """
        entry = self._entry(llm)
        calling = entry.llm.tool_calling(tools, tool_choice, chat_template)
        single = not messages or isinstance(messages[0], dict)
        conversations = [messages] if single else messages
        prompts: list[Any] = []
        for i, conversation in enumerate(conversations):
            if not conversation or not isinstance(conversation, list):
                raise _invalid("messages" if single else f"messages[{i}]",
                               "expected a non-empty list of {role, content} maps")
            prompts.append({"prompt_token_ids": entry.llm.apply_chat_template(
                conversation, chat_template, add_generation_prompt, calling.template_tools if calling else None)})
        self._start_generation(call, entry, prompts, sampling_params, calling, lora_request)

    @rpc("ml_inference", deferred=True, holds_engine=True, result="EmbedResult")
    def embed(self, call: Call, llm: Handle, input: str | list[str] | list[int] | list, pooling: str = "mean",
              normalize: bool = True, dimensions: int | None = None) -> dict:
        """Embed one input or many: each is pooled from the model's final hidden states into one vector. On a
        decoder the inputs are prefilled alongside running generations; an encoder (all-MiniLM-L6-v2) runs them
        as one padded batch.

        Args:
            llm: the LLM handle (map or ref string).
            input: a string, a list of strings, one token-id list, or a list of token-id lists.
            pooling: 'mean' (average over every token), 'last' (the last token) or 'cls' (the first token).
            normalize: scale each vector to unit L2 norm (after truncation to dimensions).
            dimensions: keep only the first this-many components (Matryoshka truncation); at most the model's
                  hidden size.
        Returns:
            An EmbedResult: data (one Embedding per input, in order) and usage (prompt and total tokens).
        """
        from lmport.engine.pooling import PoolingParams

        entry = self._entry(llm)
        inputs = _input_list(input)
        params = PoolingParams(pooling=pooling, normalize=normalize, dimensions=dimensions)
        collector = _Embeddings(call, entry, len(inputs), self._lock)

        def queue(request_ids: list[str]) -> None:
            entry.llm.add_embed_requests(inputs, params, request_ids, on_output=collector.on_output,
                                         on_error=collector.on_error)

        self._queue_requests(call, entry, len(inputs), queue, _name_the_input)

    @rpc(holds_engine=True)
    def tokenize(self, llm: Handle, text: str, add_special_tokens: bool = True) -> list[int]:
        """Turn text into token ids with the model's tokenizer.

        Args:
            llm: the LLM handle (map or ref string).
            text: the text to tokenize.
            add_special_tokens: add the tokenizer's special tokens (e.g. BOS) as the model expects.
        Returns:
            The token ids.
        """
        return self._entry(llm).llm.tokenize(text, add_special_tokens)

    @rpc(holds_engine=True)
    def detokenize(self, llm: Handle, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        """Turn token ids back into text.

        Args:
            llm: the LLM handle (map or ref string).
            token_ids: ids within the model's vocabulary.
            skip_special_tokens: leave special tokens out of the text.
        Returns:
            The text.
        """
        return self._entry(llm).llm.detokenize(token_ids, skip_special_tokens)

    @rpc()
    def release(self, ref: Handle) -> dict:
        """Free a handle; the engine is unloaded (its requests answered cancelled) when no handle refers to it.

        Args:
            ref: the handle (map or ref string) to free.
        Returns:
            {ref, unloaded}: unloaded is true when this was the engine's last handle.
        """
        entry = self._entry(ref, "ref")
        name = _ref_of(ref)
        with self._lock:
            if self._refs.pop(name, None) is None:
                raise BridgeError("not_found", f"unknown handle {name!r} (already released?)", {"field": "ref"})
            entry.refs.discard(name)
            unload = not entry.refs
            if unload:
                self._engines.pop(entry.key, None)
            calls = list(entry.calls) if unload else []
        if unload:
            for call in calls:
                call.cancel("cancelled", "the LLM handle was released")
            with self._load_lock, self._lock:
                llm, entry.llm = entry.llm, None
            if llm is not None:
                llm.shutdown()
            for call in calls:  # requests the engine never took in get their answer too
                call.finish(error=BridgeError("cancelled", "the LLM handle was released"))
        return {"ref": name, "unloaded": unload}

    @rpc()
    def ping(self, n: int = 0) -> dict:
        """Heartbeat, answered by the I/O path without waiting for the engine.

        Args:
            n: any integer, echoed back.
        Returns:
            {n, time}: time is the worker's wall clock in seconds.
        """
        return {"n": n, "time": time.time()}

    @rpc()
    def health(self) -> dict:
        """Liveness and what is loaded.

        Returns:
            {status ("ok" or "shutting_down"), pid, uptime_s, inflight, device (the first engine's; null before
            any is loaded, so health never imports torch), memory_budget_bytes, engines: [{engine, model, refs,
            device, dtype, loaded, keep_alive, loads, memory_bytes, and while loaded num_running, num_waiting,
            kv_cache_usage}]}.
        """
        with self._lock:
            entries = list(self._engines.values())
        engines = []
        for entry in entries:
            llm = entry.llm
            stats = llm.stats() if llm is not None else {}
            engines.append({"engine": entry.id, "model": entry.info["model"], "refs": sorted(entry.refs),
                            "device": entry.info["device"], "dtype": entry.info["dtype"], **entry.residency(),
                            **{k: stats[k] for k in ("num_running", "num_waiting", "kv_cache_usage") if k in stats}})
        return {"status": "shutting_down" if self._closing else "ok", "pid": os.getpid(),
                "uptime_s": time.time() - self.started, "inflight": self.inflight,
                "device": engines[0]["device"] if engines else None,
                "memory_budget_bytes": self.memory_budget_bytes, "engines": engines}

    @rpc()
    def stats(self, llm: Handle | None = None) -> dict:
        """Counters: with llm, that engine's (requests, tokens, queue, running, peak batch, KV blocks and usage,
        prefix-cache queries and hits, finish reasons); without, the service's and every engine's.

        Args:
            llm: an LLM handle to report on; omit for everything.
        Returns:
            The engine's counters map, or {service: {...}, engines: [{engine, model, refs, ...counters}]}. Each
            engine also says whether it is loaded, its keep_alive, how many times it loaded and the memory_bytes it
            holds; an engine keep_alive unloaded has no counters (reading them does not load it).
        """
        if llm is not None:
            return self._engine_stats(self._entry(llm))
        with self._lock:
            entries = list(self._engines.values())
            service = {**self._counters, "inflight": len(self._active),
                       "memory_budget_bytes": self.memory_budget_bytes,
                       "memory_in_use_bytes": sum(e.residency()["memory_bytes"] for e in entries)}
        return {"service": service, "engines": [{"engine": e.id, "model": e.info["model"], "refs": sorted(e.refs),
                                                 **self._engine_stats(e)} for e in entries]}

    @staticmethod
    def _engine_stats(entry: _Engine) -> dict[str, Any]:
        llm = entry.llm  # read once: the reaper may unload it meanwhile
        return {"engine": entry.id, **entry.residency(), **(llm.stats() if llm is not None else {})}

    @rpc()
    def shutdown(self) -> dict:
        """Stop the worker: it answers, aborts what is running (answered shutting_down) and exits 0.

        Returns:
            {shutting_down: true}.
        """
        self._closing = True
        return {"shutting_down": True}

    # --- generation ---

    def _entry(self, handle: Handle | str, field: str = "llm") -> _Engine:
        """The engine behind a handle; not_found names `field`, the parameter that held the handle."""
        ref = _ref_of(handle)
        with self._lock:
            entry = self._refs.get(ref)
        if entry is None:
            raise BridgeError("not_found", f"unknown handle {ref!r} (released, or never created)", {"field": field})
        return entry

    def _start_generation(self, call: Call, entry: _Engine, prompts: list[Any],
                          sampling_params: dict | list[dict] | None, calling: ToolCalling | None = None,
                          lora_request: dict | list[dict | None] | None = None) -> None:
        from lmport.engine.sampling_params import RequestOutputKind

        params = _sampling_list(sampling_params, len(prompts))
        if calling is not None:  # tool_choice 'required' or a named tool: a structured output enforces it
            params = [calling.constrain(sp) for sp in params]
        kind = RequestOutputKind.DELTA if call.stream else RequestOutputKind.FINAL_ONLY
        generation = _Generation(call, entry, len(prompts), self._lock, calling)

        def queue(request_ids: list[str]) -> None:
            generation.request_ids = request_ids
            entry.llm.add_requests(prompts, [sp.clone(output_kind=kind) for sp in params], request_ids,
                                   on_output=generation.on_output, on_error=generation.on_error,
                                   lora_request=lora_request)

        self._queue_requests(call, entry, len(prompts), queue, _name_the_prompt)

    def _queue_requests(self, call: Call, entry: _Engine, count: int, queue: Callable[[list[str]], None],
                        name_field: Callable[[Exception, int], None]) -> None:
        """Queue a call's `count` engine requests with queue(request_ids), all or none: when one fails validation
        none is queued and the call answers the error (name_field names the wire field); else cancelling the call
        aborts them."""
        with self._lock:
            entry.calls.add(call)
        base = f"bridge-{next(self._request_ids)}"
        request_ids = [f"{base}-{i}" for i in range(count)]
        try:
            queue(request_ids)
        except Exception as exc:  # noqa: BLE001 — the refusal is the call's answer
            name_field(exc, count)
            with self._lock:
                entry.calls.discard(call)
            call.finish(error=self.to_bridge_error(exc))
            return
        llm = entry.llm  # the engine that took them, even should release() unload it before the abort runs
        call.set_abort(lambda: [llm.abort(r) for r in request_ids])


class _Generation:
    """Collects one call's engine outputs: forwards stream deltas, tallies usage, answers when all finished."""

    def __init__(self, call: Call, entry: _Engine, count: int, service_lock: threading.Lock,
                 calling: ToolCalling | None = None) -> None:
        self.call = call
        self.entry = entry
        self.calling = calling  # a chat with tools: finished completions get their parsed tool_calls
        self._texts: dict[tuple[int, int], str] = {}  # streaming with tools: (prompt, completion) -> text so far
        self.request_ids: list[str] = []
        self._service_lock = service_lock
        self._lock = threading.Lock()
        self._remaining = count
        self._finals: list[Any] = [None] * count  # the finished RequestOutput of each prompt
        self._completion_tokens = [Counter() for _ in range(count)]  # per prompt: output index -> tokens

    def on_output(self, index: int, output: Any) -> None:
        call = self.call
        with self._lock:
            tokens = self._completion_tokens[index]
            for completion in output.outputs:
                if call.stream:
                    tokens[completion.index] += len(completion.token_ids)
                else:
                    tokens[completion.index] = len(completion.token_ids)
            if self.calling is not None:
                self._parse_tool_calls(index, output)
            if call.stream:
                call.emit(_chunk_data(index, output))
            if not output.finished:
                return
            self._finals[index] = output
            self._remaining -= 1
            if self._remaining:
                return
        self._complete()

    def _parse_tool_calls(self, index: int, output: Any) -> None:
        """Attach the calls of each completion that finished in `output` (its last chunk, when streaming)."""
        for completion in output.outputs:
            text = completion.text
            if self.call.stream:  # deltas: the whole text is what came so far
                key = (index, completion.index)
                text = self._texts[key] = self._texts.get(key, "") + text
            if completion.finish_reason is not None:
                completion.tool_calls = self.calling.parse(text, completion.finish_reason).tool_calls or None

    def on_error(self, exc: BaseException) -> None:
        from lmport.engine.llm import EngineDead

        with self._service_lock:
            self.entry.calls.discard(self.call)
        code = "engine_error" if isinstance(exc, EngineDead) else "internal"
        self.call.finish(error=BridgeError(code, f"{type(exc).__name__}: {exc}"))

    def _complete(self) -> None:
        with self._service_lock:
            self.entry.calls.discard(self.call)
        usage = self._usage()
        cancelled = self.call.cancel_error
        if cancelled is not None:
            details: dict[str, Any] = {"usage": usage, "request_ids": self.request_ids}
            if not self.call.stream:
                details["partial"] = [o.to_dict() for o in self._finals]
            self.call.finish(error=BridgeError(cancelled.code, cancelled.message, details))
        elif self.call.stream:
            self.call.finish({"usage": usage, "requests": [self._summary(i, o) for i, o in enumerate(self._finals)]})
        else:
            self.call.finish([o.to_dict() for o in self._finals])

    def _usage(self) -> dict[str, int]:
        prompt = sum(len(o.prompt_token_ids) for o in self._finals if o is not None)
        completion = sum(sum(c.values()) for c in self._completion_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _summary(self, index: int, output: Any) -> dict[str, Any]:
        tokens = self._completion_tokens[index]
        return {"index": index, "request_id": output.request_id, "prompt_tokens": len(output.prompt_token_ids),
                "num_cached_tokens": output.num_cached_tokens, "metrics": output.metrics.to_dict(),
                "outputs": [{"index": o.index, "finish_reason": o.finish_reason, "stop_reason": o.stop_reason,
                             "completion_tokens": tokens[o.index], "cumulative_logprob": o.cumulative_logprob}
                            for o in output.outputs]}


class _Embeddings:
    """Collects one embed call's outputs and answers when every input is done (or, cancelled, with the error)."""

    def __init__(self, call: Call, entry: _Engine, count: int, service_lock: threading.Lock,
                 calling: ToolCalling | None = None) -> None:
        self.call = call
        self.entry = entry
        self.calling = calling  # a chat with tools: finished completions get their parsed tool_calls
        self._texts: dict[tuple[int, int], str] = {}  # streaming with tools: (prompt, completion) -> text so far
        self._service_lock = service_lock
        self._lock = threading.Lock()
        self._remaining = count
        self._outputs: list[Any] = [None] * count

    def on_output(self, index: int, output: Any) -> None:
        with self._lock:
            self._outputs[index] = output
            self._remaining -= 1
            if self._remaining:
                return
        with self._service_lock:
            self.entry.calls.discard(self.call)
        tokens = sum(len(o.prompt_token_ids) for o in self._outputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        cancelled = self.call.cancel_error
        if cancelled is not None:
            self.call.finish(error=BridgeError(cancelled.code, cancelled.message, {"usage": usage}))
            return
        self.call.finish({"data": [{"index": i, "embedding": o.embedding, "prompt_tokens": len(o.prompt_token_ids)}
                                   for i, o in enumerate(self._outputs)], "usage": usage})

    on_error = _Generation.on_error


def _chunk_data(index: int, output: Any) -> dict[str, Any]:
    outputs = []
    for completion in output.outputs:
        data = completion.to_dict()
        del data["cumulative_logprob"]
        if data["logprobs"] is None:
            del data["logprobs"]
        outputs.append(data)
    chunk: dict[str, Any] = {"index": index, "request_id": output.request_id, "outputs": outputs,
                             "finished": output.finished}
    if output.prompt_logprobs is not None:
        chunk["prompt_logprobs"] = output.to_dict()["prompt_logprobs"]
    return chunk


class ServiceStream:
    """Async iterator over a streaming call's chunk data; `summary` holds the final response once it ends."""

    def __init__(self, service: Service, method: str, params: dict[str, Any], timeout_ms: int | None,
                 timeout_profile: str | None) -> None:
        self.summary: dict[str, Any] | None = None
        self._service = service
        self._queue: asyncio.Queue[tuple[str, Any]] | None = None
        self._args = (method, params, timeout_ms, timeout_profile)

    async def __aiter__(self) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        method, params, timeout_ms, timeout_profile = self._args
        call = Call(f"async-{id(self)}", method, params, stream=True, timeout_ms=timeout_ms,
                    timeout_profile=timeout_profile,
                    on_chunk=lambda data: loop.call_soon_threadsafe(queue.put_nowait, ("chunk", data)),
                    on_done=lambda result, error: loop.call_soon_threadsafe(queue.put_nowait, ("done", (result,
                                                                                                        error))))
        try:
            await loop.run_in_executor(None, self._service.submit, call)
            while True:
                kind, item = await queue.get()
                if kind == "chunk":
                    yield item
                    continue
                result, error = item
                if error is not None:
                    raise error
                self.summary = result
                return
        finally:
            call.cancel()  # a consumer that leaves early (or a disconnect) aborts the engine work; no-op when done


def _settle(future: asyncio.Future[Any], result: Any, error: BridgeError | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


# --- errors ---

def to_bridge_error(exc: BaseException, *, debug: bool = False) -> BridgeError:
    """Map any exception onto a protocol error (python_type always; traceback under debug). The one mapping from
    exceptions onto error codes: the service (so the stdio worker) and the HTTP server (lmport/bridge/http/errors.py)."""
    # Checked before the imports: lmport.engine.llm pulls in torch, and ping's errors (answered on the worker's
    # reader thread) must not wait for that.
    if isinstance(exc, BridgeError):
        return exc
    from lmport.engine.errors import InvalidParams, ModelNotFound, OutOfKVCache, Unsupported, UnsupportedModel
    from lmport.engine.llm import EngineDead

    if isinstance(exc, InvalidParams):
        error = _invalid(exc.field, exc.message)
    elif isinstance(exc, Unsupported):
        error = BridgeError("unsupported", str(exc), {"field": exc.field})
    elif isinstance(exc, ModelNotFound):
        error = BridgeError("not_found", str(exc), {"field": "model"})
    elif isinstance(exc, UnsupportedModel):
        error = BridgeError("invalid_params", str(exc), {"field": "model"})
    elif isinstance(exc, (OutOfKVCache, MemoryError)) or type(exc).__name__ == "OutOfMemoryError":
        error = BridgeError("out_of_memory", str(exc) or type(exc).__name__)
    elif isinstance(exc, EngineDead):
        error = BridgeError("engine_error", str(exc))
    else:
        error = BridgeError("internal", f"{type(exc).__name__}: {exc}")
    error.python_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
    if debug:
        error.traceback = "".join(traceback.format_exception(exc))
    return error


# --- parameter handling ---

def _invalid(field_name: str, message: str) -> BridgeError:
    return BridgeError("invalid_params", f"{field_name}: {message}", {"field": field_name})


def _name_the_prompt(exc: Exception, count: int) -> None:
    """InvalidParams about a prompt names the wire field it came from: prompts[i] (LLM.add_requests sets which
    prompt in `index`), or prompts when the call had one. Checks made once the model is known (logprobs against
    max_logprobs, a grammar compiled for its tokenizer) name a sampling_params field."""
    from lmport.engine.errors import InvalidParams
    from lmport.engine.sampling_params import SamplingParams

    if not isinstance(exc, InvalidParams):
        return
    if exc.field in ("prompt", "prompt_token_ids"):
        exc.field = f"prompts[{exc.index or 0}]" if count > 1 else "prompts"
    elif exc.field.split(".")[0] in SamplingParams.__dataclass_fields__:
        exc.field = f"sampling_params.{exc.field}"


def _bind(spec: MethodSpec, params: dict[str, Any]) -> dict[str, Any]:
    """Check wire params against the method's declared ones: unknown, missing and wrong-typed names fail."""
    if spec.options is not None:
        return params  # the options dataclass validates them by name
    known = {p.name: p for p in spec.params}
    for name in params:
        if name not in known:
            raise _invalid(name, f"unknown parameter of {spec.name}; expected {', '.join(known) or 'none'}")
    for p in spec.params:
        if p.name not in params:
            if p.required:
                raise _invalid(p.name, f"missing required parameter ({p.type})")
        elif not matches_type(params[p.name], p.type) and not (params[p.name] is None and not p.required):
            raise _invalid(p.name, f"expected {p.type}, got {type(params[p.name]).__name__}")
    return params


def _ref_of(handle: Any) -> str:
    return handle if isinstance(handle, str) else handle.get("ref", "")


def _name_the_input(exc: Exception, count: int) -> None:
    """InvalidParams about one input names it: input[i] when the call had several."""
    from lmport.engine.errors import InvalidParams

    if isinstance(exc, InvalidParams) and exc.field in ("input", "prompt", "prompt_token_ids") and count > 1:
        exc.field = f"input[{exc.index or 0}]"
    elif isinstance(exc, InvalidParams) and exc.field in ("prompt", "prompt_token_ids"):
        exc.field = "input"


def _input_list(inputs: Any) -> list[Any]:
    if isinstance(inputs, str):
        return [inputs]
    if not inputs:
        raise _invalid("input", "no inputs given: pass a string, a list of strings or token-id lists")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in inputs):
        return [inputs]  # one token-id input
    for i, item in enumerate(inputs):
        if not isinstance(item, (str, list)):
            raise _invalid(f"input[{i}]", f"expected a string or a token-id list, got {type(item).__name__}")
    return list(inputs)


def _prompt_list(prompts: Any) -> list[Any]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if not prompts:
        raise _invalid("prompts", "no prompts given")
    if all(isinstance(t, int) for t in prompts):
        return [prompts]  # one token-id prompt
    return list(prompts)


def _sampling_list(params: dict | list[dict] | None, count: int) -> list[Any]:
    from lmport.engine.errors import InvalidParams
    from lmport.engine.sampling_params import SamplingParams

    many = isinstance(params, list)
    if many and len(params) != count:
        raise _invalid("sampling_params", f"got {len(params)} maps for {count} prompts")
    items = params if many else [params or {}]  # one map for every prompt: parsed once, shared (callers clone)
    result = []
    for i, item in enumerate(items):
        try:
            result.append(SamplingParams.from_dict(item))
        except InvalidParams as exc:
            where = f"sampling_params[{i}]" if many else "sampling_params"
            raise _invalid(f"{where}.{exc.field}", exc.message) from None
    return result if many else result * count


def engine_key(options: dict[str, Any]) -> str:
    """What makes two `llm` calls share an engine: every option but keep_alive, which says how long the engine
    stays loaded, not what it is (the latest call's value applies)."""
    return repr(sorted((name, value) for name, value in options.items() if name != "keep_alive"))


def _engine_info(llm: Any, config: Any) -> dict[str, Any]:
    engine = llm.engine
    kv_tokens = llm.num_kv_blocks * config.block_size
    return {"model": config.model, "model_path": str(engine.model_path),
            "dtype": str(engine.dtype).removeprefix("torch."), "device": str(engine.device),
            "max_model_len": llm.max_model_len, "num_kv_blocks": llm.num_kv_blocks, "block_size": config.block_size,
            "max_num_seqs": config.max_num_seqs,
            "max_concurrency": round(min(config.max_num_seqs, kv_tokens / llm.max_model_len), 2),
            "config": config.to_dict()}
