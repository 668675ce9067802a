"""How much memory an engine takes: estimated before a load (so a memory budget can refuse it, or make room for it,
without loading anything) and measured once loaded (so the budget counts what loaded models really hold).

The estimate reads only metadata: the safetensors headers (parameter counts) and the model's config (layer and
head shapes for the KV cache), at the dtype the engine would choose. Neither lmport nor torch allocates for it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20
_ELEMENT_BYTES = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1,
                  "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}
# weight-only quantization stores linear weights in this many bytes per element (scales and zero points aside);
# others ('gguf' keeps each tensor's own code width) are estimated at the dtype's size, an upper bound
_QUANTIZED_BYTES = {"int8": 1.0, "int4": 0.5}


@dataclass(frozen=True, slots=True)
class Footprint:
    weights_bytes: int
    kv_cache_bytes: int

    @property
    def total(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes

    def to_dict(self) -> dict[str, int]:
        return {"weights_bytes": self.weights_bytes, "kv_cache_bytes": self.kv_cache_bytes,
                "total_bytes": self.total}


def estimate(options: dict[str, Any]) -> Footprint:
    """The footprint an engine with these options would have once loaded (EngineConfig's rules for the dtype and
    the KV cache size). On CUDA without kv_cache_memory_bytes the engine grows its cache to gpu_memory_utilization
    of the device, which is what this reports: give each model kv_cache_memory_bytes to share a device."""
    import torch
    from transformers import AutoConfig

    from lmport.engine.config import CPU_DEFAULT_KV_CACHE_BYTES, EngineConfig
    from lmport.engine.loader import resolve_device, resolve_dtype, resolve_model, safetensors_files
    from lmport.engine.models import get_model_class

    config = EngineConfig.from_dict(options)
    path = resolve_model(config.model, config.revision)
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, hf_config, device)
    element = _QUANTIZED_BYTES.get(config.quantization or "", torch.empty((), dtype=dtype).element_size())
    weights = int(sum(_parameter_count(f) for f in safetensors_files(path)) * element)
    if getattr(get_model_class(hf_config), "is_encoder", False):
        return Footprint(weights, 0)  # encoders run without a KV cache
    per_block = _kv_bytes_per_block(hf_config.get_text_config(), config.block_size, config.kv_cache_dtype, dtype)
    if config.num_gpu_blocks_override is not None:
        kv = config.num_gpu_blocks_override * per_block
    elif config.kv_cache_memory_bytes is not None or device.type != "cuda":
        kv = (config.kv_cache_memory_bytes or CPU_DEFAULT_KV_CACHE_BYTES) // per_block * per_block
    else:
        total = torch.cuda.mem_get_info(device)[1]
        kv = max(int(total * config.gpu_memory_utilization) - weights, 0)
    return Footprint(weights, kv)


def measure(llm: Any) -> Footprint:
    """What a loaded engine.LLM holds: its model's tensors (parameters, buffers and packed weights, each storage
    once) and its KV cache (LLM.memory_footprint)."""
    return Footprint(*llm.memory_footprint())  # in the engine's process (engine_process 'on': its child)


def _parameter_count(file: Path) -> int:
    """Elements stored in a safetensors file, from its header alone (8 bytes of length, then JSON)."""
    with file.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    count = 0
    for name, entry in header.items():
        if name == "__metadata__" or entry["dtype"] not in _ELEMENT_BYTES:
            continue
        elements = 1
        for dim in entry["shape"]:
            elements *= dim
        count += elements
    return count


def _kv_bytes_per_block(text_config: Any, block_size: int, kv_cache_dtype: str, dtype: Any) -> int:
    import torch

    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    element = 1 if kv_cache_dtype.startswith("fp8") else torch.empty((), dtype=dtype).element_size()
    return 2 * text_config.num_hidden_layers * block_size * kv_heads * head_dim * element


def describe(nbytes: int) -> str:
    return f"{nbytes / MiB:.1f} MiB ({nbytes} bytes)"
