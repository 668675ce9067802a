"""The HTTP server's engine side: lmport.bridge.service, the same methods the stdio worker serves.

Every request goes through `Service.submit` as a `Call`, exactly as a worker frame would (validation, deadlines,
cancellation, usage). The one thing the service has no method for is turning chat messages into prompt token ids
without generating: the server needs the count first (413, rate-limit cost, default max_tokens), so it asks the
engine behind the handle (`Service.get_llm`) for the chat template, and then submits token ids to `generate`.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

from lmport.bridge.http.generation import OnChunk, OnDone
from lmport.bridge.service import Call, Service
from lmport.engine.tool_calls import ToolCalling


class ServiceBackend:
    def __init__(self, engine_options: dict[str, Any], service: Service | None = None,
                 memory_budget_bytes: int | None = None) -> None:
        """With `service`, share that one (and its engines: the same options reuse the loaded engine); closing
        then releases only this server's handle. Without, a service of its own, with that memory budget."""
        self.engine_options = engine_options
        self._owns_service = service is None
        self.service = service or Service(memory_budget_bytes=memory_budget_bytes)
        self.handle: dict[str, Any] | None = None
        self.max_model_len = 0
        self._ids = itertools.count(1)

    def load(self) -> None:
        self.handle = self._call("llm", self.engine_options, timeout_profile="batch_job")
        self.max_model_len = int(self.handle["max_model_len"])

    def sibling(self, engine_options: dict[str, Any]) -> ServiceBackend:
        """A backend for another model on the same service (so one memory budget covers both); closing it
        releases only its handle."""
        return ServiceBackend(engine_options, service=self.service)

    def hold(self) -> Callable[[], None]:
        """Keep the engine loaded (loading it again first if keep_alive unloaded it) until the returned release()."""
        return self.service.hold(self.ref)

    @property
    def ref(self) -> str:
        assert self.handle is not None, "load() first"
        return self.handle["ref"]

    def _call(self, method: str, params: dict[str, Any], timeout_profile: str | None = None) -> Any:
        """A non-streaming call, waited for on this thread."""
        done = threading.Event()
        outcome: list[Any] = []

        def on_done(result: Any, error: BaseException | None) -> None:
            outcome[:] = [result, error]
            done.set()

        self.service.submit(Call(f"http-{next(self._ids)}", method, params, timeout_profile=timeout_profile,
                                 on_done=on_done))
        done.wait()
        result, error = outcome
        if error is not None:
            raise error
        return result

    def sampling_params(self, fields: dict[str, Any]) -> dict[str, Any]:
        return self._call("sampling_params", fields)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._call("tokenize", {"llm": self.ref, "text": text, "add_special_tokens": add_special_tokens})

    def detokenize(self, token_ids: list[int]) -> str:
        return self._call("detokenize", {"llm": self.ref, "token_ids": token_ids})

    def embed(self, inputs: list[list[int]], pooling: str, normalize: bool, dimensions: int | None) -> dict[str, Any]:
        """The worker's embed: an EmbedResult {data: [{index, embedding, prompt_tokens}], usage}."""
        return self._call("embed", {"llm": self.ref, "input": inputs, "pooling": pooling, "normalize": normalize,
                                    "dimensions": dimensions})

    def chat_token_ids(self, messages: list[dict[str, Any]], chat_template: str | None,
                       add_generation_prompt: bool, tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self.service.get_llm(self.ref).apply_chat_template(messages, chat_template, add_generation_prompt,
                                                                  tools)

    def tool_calling(self, tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
                     chat_template: str | None) -> ToolCalling | None:
        return self.service.get_llm(self.ref).tool_calling(tools, tool_choice, chat_template)

    def submit(self, prompts: list[list[int]], sampling: dict[str, Any], on_chunk: OnChunk, on_done: OnDone,
               lora_request: dict[str, Any] | None = None) -> Callable[[], None]:
        """Start one streaming `generate` call for every prompt (under a LoRA adapter when given); returns its
        cancel."""
        call = Call(f"http-{next(self._ids)}", "generate",
                    {"llm": self.ref, "prompts": [{"prompt_token_ids": p} for p in prompts],
                     "sampling_params": sampling, "lora_request": lora_request},
                    stream=True, on_chunk=on_chunk, on_done=on_done)
        self.service.submit(call)
        return call.cancel

    def stats(self) -> dict[str, Any]:
        """The engine's counters (read directly: a metrics scrape is not a request to count)."""
        return self.service.stats(self.ref)

    def service_stats(self) -> dict[str, Any]:
        return self.service.stats()

    def close(self) -> None:
        if self._owns_service:
            self.service.close()
        elif self.handle is not None:
            self._call("release", {"ref": self.ref})
