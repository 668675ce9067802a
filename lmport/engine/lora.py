"""LoRA adapters, as vLLM serves them: PEFT adapter directories loaded per request, several in one batch.

Each LoRA-targeted Linear gets a `LoRALayer` holding `max_loras` slots of stacked weights: A [slots, S*R, in] and
B [slots, out, S*R] for a Linear fused from S checkpoint projections (q|k|v: 3, gate|up: 2), R = max_lora_rank. A
shard's A rows and B columns sit in their own block (zero elsewhere), so one fused projection is still two matmuls
per adapter; the scale (lora_alpha / r, or / sqrt(r) with rslora) is folded into B. A step's rows are grouped by
slot (like MoE experts, lmport/engine/models/moe.py); rows without an adapter, and steps without any, pay nothing.

Slots are handed out when a request is first scheduled and returned when it finishes; a request whose adapter finds
no free slot waits in the queue. Loaded adapters stay in CPU memory, least recently used first out, up to
max_cpu_loras.
"""

from __future__ import annotations

import contextvars
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmport.engine.errors import InvalidParams
from lmport.engine.models.llama import FUSED_PROJECTIONS

FIELD = "lora_request"


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """vLLM's shape: a name, a positive id (one id = one adapter), and the PEFT adapter directory."""
    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise InvalidParams(f"{FIELD}.lora_int_id", f"must be an integer >= 1, got {self.lora_int_id!r}")
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise InvalidParams(f"{FIELD}.lora_name", "must be a non-empty string")

    @classmethod
    def of(cls, value: LoRARequest | dict | None) -> LoRARequest | None:
        """From a LoRARequest, a {lora_name, lora_int_id, lora_path} map (the worker's wire form), or None."""
        if value is None or isinstance(value, LoRARequest):
            return value
        if not isinstance(value, dict):
            raise InvalidParams(FIELD, f"expected a map with lora_name, lora_int_id, lora_path, got {value!r}")
        missing = [k for k in ("lora_name", "lora_int_id", "lora_path") if k not in value]
        extra = sorted(set(value) - {"lora_name", "lora_int_id", "lora_path"})
        if missing or extra:
            raise InvalidParams(f"{FIELD}.{(missing or extra)[0]}", "missing" if missing else "unknown field")
        return cls(**value)


@dataclass(slots=True)
class Adapter:
    """A loaded adapter: per (Linear name, shard) its A [r, in] and scaled B [out_shard, r], on the CPU."""
    request: LoRARequest
    rank: int
    weights: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]


# --- the per-step row grouping, read by every LoRALayer of one forward pass ---

@dataclass(slots=True)
class LoRABatch:
    groups: list[tuple[int, torch.Tensor]]  # (slot, the step's row indices that use it)


_current: contextvars.ContextVar[LoRABatch | None] = contextvars.ContextVar("lmport_lora_batch", default=None)


@contextmanager
def lora_context(batch: LoRABatch | None) -> Iterator[None]:
    token = _current.set(batch)
    try:
        yield
    finally:
        _current.reset(token)


def batch_for(token_slots: list[int], device: torch.device) -> LoRABatch | None:
    """Group a step's rows by adapter slot (-1 = none); None when no row has an adapter."""
    if all(slot < 0 for slot in token_slots):
        return None
    rows: dict[int, list[int]] = {}
    for row, slot in enumerate(token_slots):
        if slot >= 0:
            rows.setdefault(slot, []).append(row)
    return LoRABatch([(slot, torch.tensor(r, dtype=torch.int64, device=device)) for slot, r in sorted(rows.items())])


class LoRALayer(nn.Module):
    def __init__(self, in_features: int, output_sizes: list[int], max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.output_sizes, self.max_rank = output_sizes, max_rank
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        width = len(output_sizes) * max_rank
        self.register_buffer("a", torch.zeros(max_loras, width, in_features, dtype=dtype, device=device))
        self.register_buffer("b", torch.zeros(max_loras, sum(output_sizes), width, dtype=dtype, device=device))

    def set(self, slot: int, shards: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()
        for shard, (a, b) in shards.items():
            cols = slice(shard * self.max_rank, shard * self.max_rank + a.shape[0])
            rows = slice(self.offsets[shard], self.offsets[shard] + self.output_sizes[shard])
            self.a[slot, cols] = a.to(self.a.dtype)
            self.b[slot, rows, cols] = b.to(self.b.dtype)

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = _current.get()
        if batch is None:
            return y
        for slot, rows in batch.groups:
            y = y.index_add(0, rows, (x[rows] @ self.a[slot].T) @ self.b[slot].T)
        return y


def read_peft_adapter(request: LoRARequest, max_rank: int, targets: dict[str, list[int]]) -> Adapter:
    """Read a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) for a model whose Linear names
    and output sizes are `targets`. Every refusal is an InvalidParams naming lora_request and the numbers."""
    from safetensors.torch import load_file

    path = Path(request.lora_path).expanduser()
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise InvalidParams(f"{FIELD}.lora_path", f"{path} is not a PEFT LoRA adapter directory: no {needed.name}")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidParams(f"{FIELD}.lora_path", f"{path} is a {config['peft_type']} adapter; only LORA is served")
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    if rank > max_rank:
        raise InvalidParams(FIELD, f"adapter {request.lora_name!r} has rank {rank}, above max_lora_rank {max_rank}; "
                                   "raise the engine's max_lora_rank")
    for unsupported in ("use_dora", "fan_in_fan_out"):
        if config.get(unsupported):
            raise InvalidParams(FIELD, f"adapter {request.lora_name!r} uses {unsupported}, which is not supported")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise InvalidParams(FIELD, f"adapter {request.lora_name!r} trains biases or modules_to_save; only the LoRA "
                                   "matrices are supported")
    scale = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
    tensors = load_file(str(weights_file))
    weights: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for name, a in tensors.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_A(?:\.default)?\.weight", name)
        if match is None:
            continue
        b = tensors[name.replace("lora_A", "lora_B")]
        *prefix, proj = match[1].split(".")
        fused, shard = FUSED_PROJECTIONS.get(proj, (proj, 0))  # the checkpoint loader's own mapping
        target = ".".join([*prefix, fused])
        if target not in targets:
            raise InvalidParams(FIELD, f"adapter {request.lora_name!r} targets {match[1]!r}, which this model has no "
                                       "LoRA-capable projection for")
        if b.shape[0] != targets[target][shard]:
            raise InvalidParams(FIELD, f"adapter {request.lora_name!r}: {match[1]} has {b.shape[0]} outputs, the "
                                       f"model {targets[target][shard]} (an adapter for another model?)")
        weights[(target, shard)] = (a.float(), b.float() * scale)
    if not weights:
        raise InvalidParams(f"{FIELD}.lora_path", f"{weights_file} holds no lora_A / lora_B weights")
    return Adapter(request, rank, weights)


class LoRAManager:
    """The engine's adapters: CPU-resident ones (LRU, max_cpu_loras) and the max_loras slots of the batch."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, max_cpu_loras: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        from lmport.engine.models.layers import Linear

        self.dtype, self.device = dtype, device
        self.max_loras, self.max_rank, self.max_cpu_loras = max_loras, max_rank, max_cpu_loras
        self.linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)
                        and not name.endswith("lm_head") and not name.endswith(".gate")}  # MoE routers: never
        self.targets = {name: m.output_sizes for name, m in self.linears.items()}
        self._loaded: OrderedDict[int, Adapter] = OrderedDict()
        self._slot_of: dict[int, int] = {}  # lora_int_id -> slot
        self._users: list[int] = [0] * max_loras  # requests using each slot
        self._in_slot: list[int | None] = [None] * max_loras
        self._lock = threading.Lock()  # load() runs in callers' threads, acquire() / release() on the engine's

    def load(self, request: LoRARequest) -> Adapter:
        """Read (or reuse) the adapter; raises InvalidParams for a bad one, in the caller's thread."""
        with self._lock:
            return self._load(request)

    def _load(self, request: LoRARequest) -> Adapter:
        adapter = self._loaded.get(request.lora_int_id)
        if adapter is not None and adapter.request.lora_path != request.lora_path:
            raise InvalidParams(f"{FIELD}.lora_int_id", f"id {request.lora_int_id} is already adapter "
                                f"{adapter.request.lora_name!r} at {adapter.request.lora_path}; give each its own id")
        if adapter is None:
            adapter = read_peft_adapter(request, self.max_rank, self.targets)
            self._loaded[request.lora_int_id] = adapter
            evictable = [i for i in self._loaded if i not in self._slot_of and i != request.lora_int_id]
            for oldest in evictable[:max(0, len(self._loaded) - self.max_cpu_loras)]:
                del self._loaded[oldest]
        self._loaded.move_to_end(request.lora_int_id)
        return adapter

    def acquire(self, request: LoRARequest) -> int | None:
        """A slot holding the adapter (loading it into a free one), or None when every slot is in use."""
        with self._lock:
            slot = self._slot_of.get(request.lora_int_id)
            if slot is None:
                free = [s for s in range(self.max_loras) if self._users[s] == 0]
                if not free:
                    return None
                slot = next((s for s in free if self._in_slot[s] is None), free[0])
                self._write(slot, self._load(request))
            self._users[slot] += 1
            return slot

    def release(self, slot: int) -> None:
        with self._lock:
            self._users[slot] -= 1

    def _write(self, slot: int, adapter: Adapter) -> None:
        evicted = self._in_slot[slot]
        if evicted is not None:
            del self._slot_of[evicted]
        by_linear: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        for (name, shard), pair in adapter.weights.items():
            by_linear.setdefault(name, {})[shard] = pair
        for name, linear in self.linears.items():
            layer = linear.lora
            if name in by_linear and layer is None:  # first adapter to target this Linear
                layer = linear.lora = LoRALayer(linear.input_size, linear.output_sizes, self.max_loras,
                                                self.max_rank, self.dtype, self.device)
            if layer is not None:
                if name in by_linear:
                    layer.set(slot, by_linear[name])
                else:
                    layer.clear(slot)
        self._in_slot[slot] = adapter.request.lora_int_id
        self._slot_of[adapter.request.lora_int_id] = slot
