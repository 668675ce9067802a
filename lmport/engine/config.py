"""Engine options, with vLLM's names, validated once at construction.

Each field's metadata (doc, range, choices) is the single source of truth for the manifest, the generated client
option types and the options table of docs/engine.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from lmport.engine.errors import InvalidParams

GiB = 1 << 30
CPU_DEFAULT_KV_CACHE_BYTES = 2 * GiB


def _opt(default: Any, doc: str, **limits: Any) -> Any:
    return field(default=default, metadata={"doc": doc, **limits})


@dataclass(slots=True)
class EngineConfig:
    model: str = _opt("smollm2", "Model to load: 'smollm2' (the bundled SmolLM2-135M-Instruct), a local HF directory, "
                      "a local .gguf file, or a hub id already present in the local HF cache.")
    revision: str | None = _opt(None, "Revision of a hub model to look up in the local HF cache.")
    tokenizer: str | None = _opt(None, "Tokenizer to use instead of the model's own (same forms as model).")
    dtype: str = _opt("auto", "Weight and activation dtype; 'auto' takes the model config's dtype.",
                      choices=["auto", "float32", "bfloat16", "float16"])
    max_model_len: int | None = _opt(None, "Longest sequence (prompt + output) in tokens; default: the model's limit.",
                                     min=1)
    trust_remote_code: bool = _opt(False, "Allow the tokenizer/config to run code shipped with the model.")
    device: str = _opt("auto", "Device to run on: 'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'.")
    gpu_memory_utilization: float = _opt(0.9, "Fraction of GPU memory the engine may use (CUDA only).",
                                         min=0.0, max=1.0)
    kv_cache_memory_bytes: int | None = _opt(None, "Bytes reserved for the KV cache; overrides "
                                             "gpu_memory_utilization. CPU default: 2 GiB.", min=1)
    max_num_seqs: int = _opt(256, "Most sequences running in one batch.", min=1)
    max_num_batched_tokens: int = _opt(8192, "Most tokens (prefill + decode) computed in one engine step.", min=1)
    enable_prefix_caching: bool = _opt(True, "Reuse KV blocks of identical prompt prefixes across requests.")
    enable_chunked_prefill: bool = _opt(True, "Split long prompts across steps so decodes keep flowing.")
    block_size: int = _opt(16, "Tokens per KV-cache block.", choices=[8, 16, 32, 64, 128])
    seed: int = _opt(0, "Seed of the engine's generator for requests without their own seed.", min=0)
    enforce_eager: bool = _opt(False, "Run every step module by module: no CUDA graphs for decode steps on CUDA, no "
                                      "C++ decode stack on CPU.")
    num_gpu_blocks_override: int | None = _opt(None, "Use exactly this many KV blocks (testing, preemption).", min=1)
    max_logprobs: int = _opt(20, "Largest logprobs / prompt_logprobs a request may ask for.", min=0)
    kernel_backend: str = _opt("auto", "Kernels to run: 'auto' (Triton on CUDA, the C++ kernels on CPU), 'triton', "
                               "or 'torch' (the PyTorch reference everywhere, for debugging).",
                               choices=["auto", "triton", "torch"])
    quantization: str | None = _opt(None, "Weight-only quantization applied on load, on CPU: 'int8' (symmetric, per "
                                    "output channel) or 'int4' (asymmetric, per group of quantization_group_size "
                                    "input channels); 'gguf' keeps a GGUF file's own Q4_0/Q4_1/Q4_K codes as int4 "
                                    "(group 32) and its Q8_0 tensors as int8; null keeps the weights in the model "
                                    "dtype. 'awq' and 'gptq' load such 4-bit checkpoints (AutoAWQ's gemm layout; "
                                    "GPTQ without act-order) with their own codes as int4; a checkpoint's "
                                    "quantization_config selects them by itself when this is null.",
                                    choices=["int8", "int4", "gguf", "awq", "gptq"])
    quantization_group_size: int = _opt(32, "Input channels sharing one int4 scale and zero point.",
                                        choices=[32, 64, 128])
    enable_lora: bool = _opt(False, "Serve LoRA adapters (PEFT directories) named by each request's lora_request.")
    max_loras: int = _opt(1, "Adapters that can run in one batch (each holds a slot of stacked weights).", min=1)
    max_lora_rank: int = _opt(16, "Largest adapter rank accepted (sizes the slots).", min=1)
    max_cpu_loras: int | None = _opt(None, "Adapters kept loaded in CPU memory (least recently used out); default "
                                     "max_loras.", min=1)
    kv_cache_dtype: str = _opt("auto", "KV-cache element type: 'auto' stores K/V in the model dtype; 'fp8' (= "
                               "'fp8_e4m3') and 'fp8_e5m2' store one byte per element (twice the tokens per GiB of "
                               "bf16) with per-tensor scales of 1.0 (vLLM's default without calibrated scales).",
                               choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"])
    keep_alive: float | None = _opt(None, "Seconds an idle engine stays loaded in a worker or server (Ollama's "
                                    "keep_alive): after this long with no call in flight its weights and KV cache are "
                                    "freed, and the next call on the handle loads it again. null or negative: never "
                                    "unload; 0: unload after each call. Not part of the engine's identity (the latest "
                                    "llm call's value applies to a shared engine); the offline LLM ignores it.")
    swap_space: float = _opt(0, "GiB of CPU swap for preempted sequences' KV (vLLM). lmport recomputes preempted "
                             "sequences (mostly from the prefix cache) and never swaps: only 0 is accepted.", min=0)
    cpu_offload_gb: float = _opt(0, "GiB of weights to keep in CPU memory and stream to the GPU (vLLM). Not "
                                 "implemented: only 0 is accepted (use quantization to shrink the weights).", min=0)
    tensor_parallel_size: int = _opt(1, "Processes to shard each decoder layer across (vLLM), on CPU over gloo: "
                                     "attention heads and MLP channels are split evenly, so it must divide the "
                                     "model's head, KV-head and intermediate sizes; Llama-architecture models only "
                                     "(Llama, Mistral, Qwen2, Phi-3, Qwen3, Granite). The engine's process is rank "
                                     "0 and starts the others. For throughput, a worker pool usually serves better "
                                     "(docs/scaling.md#tensor-parallelism).", min=1)
    pipeline_parallel_size: int = _opt(1, "Processes to split the layers across (vLLM). Only 1: run a worker pool "
                                       "for more processes (docs/scaling.md).", min=1)
    distributed_executor_backend: str | None = _opt(None, "How vLLM runs its shards: null and 'mp' start the "
                                                    "tensor-parallel ranks as local processes, 'ray' as Ray actors "
                                                    "on this machine (a local Ray it starts, or RAY_ADDRESS's "
                                                    "cluster; with tensor_parallel_size 1 the engine runs in the "
                                                    "calling process, without Ray); 'uni', one process, only with "
                                                    "tensor_parallel_size 1; 'external_launcher' is refused "
                                                    "(unsupported).",
                                                    choices=["uni", "mp", "ray", "external_launcher"])
    lora_extra_vocab_size: int = _opt(256, "Extra vocabulary slots for LoRA adapters (vLLM, deprecated there). "
                                      "Adapters that add tokens are not supported: only the default is accepted.",
                                      min=0)
    structured_outputs_backend: str = _opt("auto", "Library enforcing structured_outputs: 'auto' or 'xgrammar' (the "
                                           "only one; vLLM's guidance and outlines are not bundled). Alias: "
                                           "guided_decoding_backend.", choices=["auto", "xgrammar"])
    engine_process: str = _opt("auto", "Where the model runs: 'on' in a child process (lmport.engine.engine_process), "
                               "so a worker's reader and writer (or a server's event loop) never wait for the "
                               "model's GIL; 'off' on a thread of the calling process; 'auto' is 'off': 'on' cut the "
                               "ping p99 under 32 generations 3x when the model's torch threads left a core free, "
                               "not when they took every core (docs/scaling.md#the-engine-in-its-own-process). "
                               "The child stays in the caller's "
                               "process group, dies with it, and with tensor_parallel_size > 1 is rank 0.",
                               choices=["auto", "on", "off"])

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_field(f, getattr(self, f.name), EngineConfig)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise InvalidParams("device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        _refuse_unimplemented(self)
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise InvalidParams("max_cpu_loras", f"must be >= max_loras ({self.max_loras}), got {self.max_cpu_loras}")
        if not self.enable_chunked_prefill and self.max_model_len is not None \
                and self.max_num_batched_tokens < self.max_model_len:
            raise InvalidParams("max_num_batched_tokens", f"must be >= max_model_len ({self.max_model_len}) "
                                "when enable_chunked_prefill is off")

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> EngineConfig:
        if "guided_decoding_backend" in options:  # vLLM's older name
            if "structured_outputs_backend" in options:
                raise InvalidParams("guided_decoding_backend", "give structured_outputs_backend or its alias "
                                    "guided_decoding_backend, not both")
            options = {k: v for k, v in options.items() if k != "guided_decoding_backend"} | {
                "structured_outputs_backend": options["guided_decoding_backend"]}
        reject_unknown_keys(options, cls, "engine option")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


def _refuse_unimplemented(config: EngineConfig) -> None:
    """vLLM's options that lmport accepts by name but does not implement: refused unless at their no-op value, each
    saying what to use instead (docs/engine.md#vllm-options-that-are-refused)."""
    from lmport.engine.errors import Unsupported

    if config.swap_space:
        raise Unsupported("swap_space", "preempted sequences are recomputed (mostly from the prefix cache), never "
                                        "swapped; leave swap_space at 0")
    if config.cpu_offload_gb:
        raise Unsupported("cpu_offload_gb", "weight offloading is not implemented; use quantization='int8' or "
                                            "'int4' to shrink the weights, or a smaller model")
    if config.pipeline_parallel_size > 1:
        raise Unsupported("pipeline_parallel_size", "layers are not split across processes; for more processes "
                                                    "run a worker pool (docs/scaling.md), each with its own copy of "
                                                    "the model, or shard layers with tensor_parallel_size")
    if config.distributed_executor_backend == "external_launcher":
        raise Unsupported("distributed_executor_backend", "'external_launcher' is not implemented; use null, "
                          "'uni', 'mp' (tensor-parallel ranks run as local processes) or 'ray' (as Ray actors)")
    if config.tensor_parallel_size > 1:
        if config.distributed_executor_backend == "uni":
            raise InvalidParams("distributed_executor_backend", "'uni' runs one process; tensor_parallel_size > 1 "
                                "needs 'mp', 'ray' or null")
        if config.enable_lora:
            raise Unsupported("enable_lora", "LoRA adapters are not sharded across tensor-parallel ranks; use "
                                             "tensor_parallel_size 1 with enable_lora")
    if config.lora_extra_vocab_size != 256:
        raise Unsupported("lora_extra_vocab_size", "LoRA adapters that add vocabulary are not supported; leave it "
                                                   "at 256")


def reject_unknown_keys(given: dict[str, Any], owner: type | Collection[str], what: str) -> None:
    """A typo must never be silently ignored: name the first unknown key and suggest the closest known one. `owner`
    is the dataclass whose fields are the known keys, or the known names themselves."""
    known = {f.name for f in dataclasses.fields(owner)} if isinstance(owner, type) else set(owner)
    unknown = sorted(set(given) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(known))}"
        raise InvalidParams(unknown[0], f"unknown {what}; {hint}")


# --- schema derivation (SamplingParams uses the same helpers) ---

_TYPE_NAMES = {str: "str", int: "int", float: "float", bool: "bool", type(None): "null", dict: "dict", list: "list"}


def type_name(annotation: Any) -> str:
    """Render a type annotation in the manifest's small type vocabulary ("int|null", "list[str]", ...)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {})  # annotations are strings under `from __future__`
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return "|".join(type_name(a) for a in typing.get_args(annotation))
    if origin in (list, tuple, set):
        args = typing.get_args(annotation)
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin is dict:
        return "dict"
    if annotation is typing.Any:
        return "any"
    return _TYPE_NAMES.get(annotation, "any")


def field_schema(f: dataclasses.Field, owner: type) -> dict[str, Any]:
    hints = typing.get_type_hints(owner)
    default = f.default if f.default is not dataclasses.MISSING else None
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = f.default_factory()  # type: ignore[misc]
    if hasattr(default, "value"):  # enums travel as their value
        default = default.value
    entry: dict[str, Any] = {"name": f.name, "type": type_name(hints[f.name]), "required": False,
                             "default": default, "doc": f.metadata.get("doc", "")}
    for key in ("choices", "min", "max", "exclusive_min"):
        if key in f.metadata:
            entry[key] = f.metadata[key]
    return entry


def option_schema() -> list[dict[str, Any]]:
    """Every engine option as {name, type, required, default, doc, choices?, min?, max?}."""
    return [field_schema(f, EngineConfig) for f in dataclasses.fields(EngineConfig)]


def check_field(f: dataclasses.Field, value: Any, owner: type) -> None:
    """Check one field of the dataclass `owner` against its type hint and its metadata (choices, min, max); the
    error names the field. EngineConfig and the server's settings (lmport/bridge/http/config.py) validate through it."""
    expected = type_name(typing.get_type_hints(owner)[f.name]).split("|")
    if value is None and "null" in expected:
        return
    if expected[0].startswith("list["):
        item = [expected[0][len("list["):-1]]
        if not isinstance(value, list) or not all(_is_kind(v, item) for v in value):
            raise InvalidParams(f.name, f"expected a list of {item[0]}, got {type(value).__name__} {value!r}")
        return
    if not _is_kind(value, expected):
        raise InvalidParams(f.name, f"expected {' or '.join(t for t in expected if t != 'null')}, "
                                    f"got {type(value).__name__} {value!r}")
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise InvalidParams(f.name, f"must be one of {meta['choices']}, got {value!r}")
    if "min" in meta and value < meta["min"]:
        raise InvalidParams(f.name, f"must be >= {meta['min']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise InvalidParams(f.name, f"must be <= {meta['max']}, got {value!r}")


def _is_kind(value: Any, kinds: list[str]) -> bool:
    return (("bool" in kinds and isinstance(value, bool))
            or ("int" in kinds and isinstance(value, int) and not isinstance(value, bool))
            or ("float" in kinds and isinstance(value, (int, float)) and not isinstance(value, bool))
            or ("str" in kinds and isinstance(value, str)))
