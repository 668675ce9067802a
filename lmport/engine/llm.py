"""The public engine API: offline `generate`/`chat`, and a thread-safe streaming front for the bridge.

One background thread owns the LLMEngine and runs its step loop; any thread may add or abort requests between two
steps. Everything added concurrently is batched together by the scheduler.
"""

from __future__ import annotations

import functools
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from lmport.engine.config import EngineConfig
from lmport.engine.encoder_engine import EncoderEngine, create_engine
from lmport.engine.errors import InvalidParams, LMPortError
from lmport.engine.llm_engine import LLMEngine, Prompt
from lmport.engine.lora import LoRARequest
from lmport.engine.outputs import EmbeddingOutput, RequestOutput
from lmport.engine.pooling import PoolingParams
from lmport.engine.sampling_params import RequestOutputKind, SamplingParams, check_token_ids
from lmport.engine.sequence import Request
from lmport.engine.tool_calls import ToolCalling, family_for_template, messages_for_template

if TYPE_CHECKING:
    from lmport.engine.engine_process import EngineProcess

logger = logging.getLogger("lmport")

class EngineDead(LMPortError):
    """The engine's step loop failed; every request in flight fails with this error."""


class RequestStream:
    """The outputs of one request, in order; iterating blocks until the next one (the last has finished=True)."""

    def __init__(self, request_id: str, llm: Any) -> None:  # anything with abort(request_id)
        self.request_id = request_id
        self._llm = llm
        self._queue: queue.SimpleQueue[RequestOutput | BaseException] = queue.SimpleQueue()

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put(item)

    def __iter__(self) -> Iterator[RequestOutput]:
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    def result(self) -> RequestOutput:
        """Wait for the final output."""
        last = None
        for last in self:
            pass
        assert last is not None
        return last

    def abort(self) -> bool:
        return self._llm.abort(self.request_id)


class LLM:
    """engine_process 'on' runs the engine in a child process (lmport.engine.engine_process) behind the same API:
    `engine` is then only its facts (model_path, dtype, device, vocab_size, ...), and this process keeps a copy of
    the tokenizer for chat templates, tokenize and detokenize."""

    def __init__(self, model: str = "smollm2", **engine_options: Any) -> None:
        config = EngineConfig.from_dict({"model": model, **engine_options})
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers are not safe to share across threads
        self._on_step: Callable[[], None] | None = None  # called on the engine thread after every step
        self._process: EngineProcess | None = None
        if resolve_engine_process(config) == "on":
            self._start_process(config)
            return
        self._commands: list[Callable[[], None]] = []
        self._error_callbacks: dict[str, Callable[[BaseException], None]] = {}
        self._dead: BaseException | None = None
        self._stopping = False
        # The engine thread loads the model too, so every parallel torch op runs on one long-lived thread: when the
        # first one runs on a thread that later exits (a request handler's, say), the OpenMP pool it started keeps
        # competing with the engine and every step becomes many times slower.
        loaded: list[LLMEngine | EncoderEngine | BaseException] = []
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(config, loaded, ready), name="lmport-engine",
                                        daemon=True)
        self._thread.start()
        ready.wait()
        if isinstance(loaded[0], BaseException):
            raise loaded[0]
        self.engine = loaded[0]
        # The options as resolved: "auto" dtype/device and the default max_model_len replaced by what was chosen.
        self.config = self.engine.config.replace(dtype=str(self.engine.dtype).removeprefix("torch."),
                                                 device=str(self.engine.device),
                                                 max_model_len=self.engine.max_model_len,
                                                 engine_process="off")
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.num_kv_blocks = self.engine.num_kv_blocks
        self.is_encoder = isinstance(self.engine, EncoderEngine)

    def _start_process(self, config: EngineConfig) -> None:
        from lmport.engine.engine_process import EngineProcess

        self._process = EngineProcess(config)  # a load error in the child is raised here
        facts = self._process.facts
        self.engine = facts  # type: ignore[assignment]
        self.config = facts.config.replace(engine_process="on")
        self.tokenizer = facts.tokenizer
        self.max_model_len = facts.max_model_len
        self.num_kv_blocks = facts.num_kv_blocks
        self.is_encoder = facts.is_encoder

    # --- streaming front ---

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                    request_id: str | None = None, on_output: Callable[[RequestOutput], None] | None = None,
                    on_error: Callable[[BaseException], None] | None = None,
                    lora_request: LoRARequest | dict | None = None) -> RequestStream:
        """Queue a request; outputs go to on_output (called on the engine thread) or to the returned stream.

        Validation errors (InvalidParams) are raised here, in the caller's thread.
        """
        params = sampling_params if sampling_params is not None else SamplingParams()
        if self._process is not None:
            deliver = None if on_output is None else lambda _index, output: on_output(output)
            try:
                return self._process.add("generate1", (prompt, params, lora_request), [request_id], deliver,
                                         on_error, self)[0]
            except InvalidParams as exc:
                exc.index = None  # one request: no index, as in thread mode
                raise
        make = functools.partial(self.engine.make_request, prompt=prompt, params=params, lora_request=lora_request)
        stream, queued = self._prepare(make, request_id, on_output, on_error)
        self._enqueue([queued])
        return stream

    def add_requests(self, prompts: Sequence[Prompt], sampling_params: Sequence[SamplingParams],
                     request_ids: Sequence[str | None] | None = None,
                     on_output: Callable[[int, RequestOutput], None] | None = None,
                     on_error: Callable[[BaseException], None] | None = None,
                     lora_request: LoRARequest | dict | Sequence[LoRARequest | dict | None] | None = None,
                     ) -> list[RequestStream]:
        """Queue several requests, all or none: every prompt is validated (in the caller's thread) before any is
        queued, and they join the same engine step. on_output gets each output with its prompt's index.
        lora_request: one adapter for every prompt, or a list with one (or None) per prompt.

        An InvalidParams raised for one prompt carries `index`, that prompt's position, so a caller can name it.
        """
        if len(sampling_params) != len(prompts):
            raise InvalidParams("sampling_params", f"got {len(sampling_params)} sampling params for "
                                                   f"{len(prompts)} prompts")
        adapters = _per_prompt(lora_request, len(prompts))
        if self._process is not None:
            return self._process.add("generate", (list(prompts), list(sampling_params), adapters),
                                     _request_ids(request_ids, len(prompts)), on_output, on_error, self)
        makers = [functools.partial(self.engine.make_request, prompt=prompt, params=params, lora_request=adapter)
                  for prompt, params, adapter in zip(prompts, sampling_params, adapters)]
        return self._add_all(makers, request_ids, on_output, on_error)

    def add_embed_requests(self, inputs: Sequence[Prompt], params: PoolingParams,
                           request_ids: Sequence[str | None] | None = None,
                           on_output: Callable[[int, EmbeddingOutput], None] | None = None,
                           on_error: Callable[[BaseException], None] | None = None) -> list[RequestStream]:
        """Queue embed requests, all or none, like add_requests: each is a prefill-only request (on a decoder it is
        scheduled with the running generations) whose one output is an EmbeddingOutput."""
        if not inputs:
            raise InvalidParams("input", "no inputs to embed: give at least one text or token-id list")
        if self._process is not None:
            return self._process.add("embed", (list(inputs), params), _request_ids(request_ids, len(inputs)),
                                     on_output, on_error, self)
        makers = [functools.partial(self.engine.make_embed_request, prompt=prompt, params=params) for prompt in inputs]
        return self._add_all(makers, request_ids, on_output, on_error)

    def _add_all(self, makers: list[Callable[..., Request]], request_ids: Sequence[str | None] | None,
                 on_output: Callable[[int, Any], None] | None,
                 on_error: Callable[[BaseException], None] | None) -> list[RequestStream]:
        ids = _request_ids(request_ids, len(makers))
        prepared = []
        for i, (make, request_id) in enumerate(zip(makers, ids)):
            deliver = None if on_output is None else functools.partial(on_output, i)
            try:
                prepared.append(self._prepare(make, request_id, deliver, on_error))
            except InvalidParams as exc:
                exc.index = i
                raise
        self._enqueue([queued for _, queued in prepared])
        return [stream for stream, _ in prepared]

    def _prepare(self, make: Callable[..., Request], request_id: str | None, on_output: Callable[[Any], None] | None,
                 on_error: Callable[[BaseException], None] | None,
                 ) -> tuple[RequestStream, tuple[Request, Callable[[BaseException], None]]]:
        """Validate and tokenize in the caller's thread (make(request_id=, on_output=)); nothing reaches the engine
        yet."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        stream = RequestStream(request_id, self)
        deliver = on_output or stream._put

        def on_engine_output(output: RequestOutput) -> None:
            if output.finished:
                self._error_callbacks.pop(request_id, None)
            deliver(output)

        with self._tokenizer_lock:
            request = make(request_id=request_id, on_output=on_engine_output)
        return stream, (request, on_error or stream._put)

    def _enqueue(self, queued: list[tuple[Request, Callable[[BaseException], None]]]) -> None:
        """Hand requests to the engine thread together: they join the same step (offline batches are reproducible)."""
        with self._lock:
            if self._dead is not None:
                raise EngineDead(f"the engine stopped after an error: {self._dead}")
            if self._stopping:
                raise EngineDead("the engine is shutting down")
            for request, _ in queued:
                if request.request_id in self._error_callbacks:
                    raise InvalidParams("request_id", f"request id {request.request_id!r} is already in flight")
            for request, on_error in queued:
                self._error_callbacks[request.request_id] = on_error
                self._commands.append(functools.partial(self.engine.add_request, request))
            self._lock.notify()

    def abort(self, request_id: str) -> bool:
        """Abort a request between two steps: its blocks are freed and it finishes with finish_reason 'abort'.

        Returns False when the id is unknown or already finished (abort is idempotent)."""
        if self._process is not None:
            return self._process.abort(request_id)
        with self._lock:
            known = request_id in self._error_callbacks
            if known:
                self._commands.append(lambda: self.engine.abort(request_id))
                self._lock.notify()
        return known

    def stats(self) -> dict[str, Any]:
        if self._process is not None:
            return self._process.stats()
        with self._lock:
            return self.engine.stats()

    def memory_footprint(self) -> tuple[int, int]:
        """(weights_bytes, kv_cache_bytes): the model's tensors (parameters, buffers and packed weights, each
        storage once) and its KV cache."""
        if self._process is not None:
            return self._process.memory_footprint()
        with self._lock:
            return _memory_footprint(self.engine)

    def shutdown(self) -> None:
        """Every request in flight finishes (finish_reason 'abort'); later adds raise EngineDead."""
        if self._process is not None:
            self._process.shutdown()
            return
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _run(self, config: EngineConfig, loaded: list[LLMEngine | EncoderEngine | BaseException],
             ready: threading.Event) -> None:
        try:
            loaded.append(create_engine(config))
        except BaseException as exc:  # noqa: BLE001 — re-raised in the constructing thread
            loaded.append(exc)
            return
        finally:
            ready.set()
        try:
            self._loop(loaded[0])
        finally:
            loaded[0].close()

    def _loop(self, engine: LLMEngine | EncoderEngine) -> None:
        while True:
            with self._lock:
                while not self._commands and not engine.has_work() and not self._stopping:
                    self._lock.wait()
                commands, self._commands = self._commands, []
                if self._stopping:  # requests still queued are added first, so every one gets its final output
                    for command in commands:
                        command()
                    for request_id in list(engine.requests):
                        engine.abort(request_id)
                    return
            try:
                with self._lock:  # stats() readers see a consistent engine between steps
                    for command in commands:
                        command()
                engine.step()
            except Exception as exc:  # noqa: BLE001 — a failed step must fail its requests, never hang them
                logger.exception("engine step failed")
                self._fail_all(exc)
                return
            finally:
                if self._on_step is not None:
                    self._on_step()

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            self._dead = exc
            callbacks, self._error_callbacks = self._error_callbacks, {}
        error = EngineDead(f"engine step failed: {type(exc).__name__}: {exc}")
        for callback in callbacks.values():
            callback(error)

    # --- offline API ---

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True,
                 lora_request: LoRARequest | dict | Sequence[LoRARequest | dict | None] | None = None,
                 ) -> list[RequestOutput]:
        """Complete every prompt (batched together); lora_request as vLLM's: one adapter for all, or one per
        prompt (None = the base model). The engine needs enable_lora=True for it."""
        prompt_list = _as_prompt_list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompt_list):
                raise InvalidParams("sampling_params", f"got {len(sampling_params)} sampling params for "
                                                       f"{len(prompt_list)} prompts")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params or SamplingParams()] * len(prompt_list)
        # all or none: a bad prompt fails the call before any is queued
        streams = self.add_requests(prompt_list, [sp.clone(output_kind=RequestOutputKind.FINAL_ONLY)
                                                  for sp in params_list], lora_request=lora_request)
        results: list[RequestOutput] = []
        with tqdm(total=len(streams), desc="Processed prompts", unit="req", disable=not use_tqdm or len(streams) < 2,
                  dynamic_ncols=True) as bar:
            start, tokens = time.perf_counter(), 0
            for stream in streams:
                output = stream.result()
                results.append(output)
                tokens += sum(len(o.token_ids) for o in output.outputs)
                bar.update(1)
                bar.set_postfix(output_tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.1f}")
        return results

    def embed(self, texts: Prompt | Sequence[Prompt], pooling: str = "mean", normalize: bool = True,
              dimensions: int | None = None, use_tqdm: bool = True) -> list[EmbeddingOutput]:
        """One embedding per text (or token-id list / prompt map), in order: `pooling` ("mean", "last" or "cls")
        over the final hidden states, L2-normalized with normalize, truncated to `dimensions` first when given.
        On a decoder the inputs are prefilled alongside whatever else is running."""
        params = PoolingParams(pooling=pooling, normalize=normalize, dimensions=dimensions)
        streams = self.add_embed_requests(_as_prompt_list(texts), params)
        results: list[EmbeddingOutput] = []
        with tqdm(total=len(streams), desc="Embedded inputs", unit="input", disable=not use_tqdm or len(streams) < 2,
                  dynamic_ncols=True) as bar:
            for stream in streams:
                results.append(stream.result())  # type: ignore[arg-type]
                bar.update(1)
        return results

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = True, tools: list[dict[str, Any]] | None = None,
             tool_choice: str | dict[str, Any] | None = None,
             lora_request: LoRARequest | dict | Sequence[LoRARequest | dict | None] | None = None,
             ) -> list[RequestOutput]:
        """Replies through the chat template. With `tools` (OpenAI's function tools) the template renders them and
        each completion carries `tool_calls` parsed from its text (which stays as generated); tool_choice
        'required' or a named tool constrains the output as vLLM does (structured outputs), 'none' neither
        shows the tools to the model nor parses calls."""
        calling = self.tool_calling(tools, tool_choice, chat_template)
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.apply_chat_template(c, chat_template, add_generation_prompt,
                                                                 calling.template_tools if calling else None)}
                   for c in conversations]  # type: ignore[arg-type]
        if calling is None:
            return self.generate(prompts, sampling_params, use_tqdm, lora_request)
        if isinstance(sampling_params, (list, tuple)):
            sampling_params = [calling.constrain(sp) for sp in sampling_params]
        else:
            sampling_params = calling.constrain(sampling_params or SamplingParams())
        results = self.generate(prompts, sampling_params, use_tqdm, lora_request)
        for result in results:
            for output in result.outputs:
                output.tool_calls = calling.parse(output.text, output.finish_reason).tool_calls or None
        return results

    def tool_calling(self, tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None = None,
                     chat_template: str | None = None) -> ToolCalling | None:
        """Validated tools and tool_choice (InvalidParams naming the field), parsed in the template's format."""
        return ToolCalling.from_request(tools, tool_choice, family_for_template(self._template_text(chat_template)))

    def apply_chat_template(self, messages: list[dict[str, Any]], chat_template: str | None = None,
                            add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The prompt's token ids; `tools` (validated) are rendered by a template that knows them, else written
        into the messages in the hermes format (lmport.engine.tool_calls.messages_for_template)."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise InvalidParams("messages", "expected a list of {role, content} maps")
        messages, pass_tools = messages_for_template(messages, tools, self._template_text(chat_template))
        with self._tokenizer_lock:
            ids = self.tokenizer.apply_chat_template(messages, chat_template=chat_template,
                                                     tools=tools if pass_tools else None,
                                                     add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def _template_text(self, chat_template: str | None) -> str | None:
        template = chat_template or getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):  # named templates: transformers picks "tool_use" when there are tools
            template = template.get("tool_use") or template.get("default")
        return template if isinstance(template, str) else None

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self._tokenizer_lock:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        token_ids = check_token_ids(token_ids, "token_ids", self.engine.vocab_size)
        with self._tokenizer_lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def resolve_engine_process(config: EngineConfig) -> str:
    """'on' or 'off': 'auto' is 'off' (docs/scaling.md#the-engine-in-its-own-process)."""
    return "on" if config.engine_process == "on" else "off"


def _request_ids(request_ids: Sequence[str | None] | None, count: int) -> list[str | None]:
    return list(request_ids) if request_ids is not None else [None] * count


def _memory_footprint(engine: LLMEngine | EncoderEngine) -> tuple[int, int]:
    runner = getattr(engine, "runner", None)
    model = runner.model if runner is not None else engine.model
    storages: dict[int, int] = {}
    tensors = [*model.parameters(), *model.buffers(), *model.state_dict(keep_vars=True).values()]
    for tensor in tensors:
        if hasattr(tensor, "untyped_storage"):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    kv_cache = getattr(runner, "kv_cache", None)
    return sum(storages.values()), 0 if kv_cache is None else kv_cache.numel() * kv_cache.element_size()


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one token-id prompt
    return list(prompts)


def _per_prompt(lora_request: LoRARequest | dict | Sequence[LoRARequest | dict | None] | None,
                count: int) -> list[LoRARequest | dict | None]:
    """One adapter (or None) per prompt, from one for all or a list with one each."""
    if lora_request is None or isinstance(lora_request, (LoRARequest, dict)):
        return [lora_request] * count
    adapters = list(lora_request)
    if len(adapters) != count:
        raise InvalidParams("lora_request", f"got {len(adapters)} LoRA requests for {count} prompts")
    return adapters
