"""`quantization="gguf"`: a GGUF model's Linear weights come straight from the file's quantized blocks.

Q4_0, Q4_1 and Q4_K hold 4-bit codes with a scale and an offset per 32 weights (w = code * scale + offset), which is
exactly lmport's int4 form (`Int4Weight`, group size 32): the codes are copied, not re-quantized, so the weights are
the file's own. Q8_0 (signed 8-bit codes, a scale per 32 weights) is lmport's int8 form with block scales
(`Int8Weight`) where lmport's W8A8 kernel runs (bf16 on AVX-512 VNNI), codes copied too; elsewhere torch's int8
kernel takes per-channel scales only, so those tensors are re-quantized per channel from their values. Every other
type (F32, F16, Q5_*, Q6_K, ...) stays in the model dtype. The rest of the model (norms, embeddings) loads from the
converted directory as always.

The block layouts are ggml's (ggml-common.h; gguf-py's quants.py dequantizes the same blocks, and the tests check
these codes against it). They are parsed here with numpy because no library hands out the codes themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmport.engine.errors import InvalidParams
from lmport.engine.quantization import Int4Weight, Int8Weight, attach_quantized, shared_parameters

logger = logging.getLogger("lmport")

GROUP_SIZE = 32  # every 4-bit ggml type scales blocks (or sub-blocks) of 32 weights
Q4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
# architectures whose converter permutes q/k rows into llama.cpp's interleaved rotary layout (transformers undoes it)
_PERMUTED_QK = ("llama", "mistral")

Blocks = tuple[np.ndarray, np.ndarray, np.ndarray]  # codes [N, K], scales [N, K/32], offsets [N, K/32]


def checked_gguf_source(model_dir: Path, device: torch.device, sharded: bool) -> Path:
    """The .gguf file a converted directory came from (lmport.engine.gguf_convert records it in model.safetensors);
    InvalidParams naming `quantization` where 'gguf' cannot apply."""
    from safetensors import safe_open

    weights = model_dir / "model.safetensors"
    source = None
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            source = (f.metadata() or {}).get("source")
    if not source or not source.endswith(".gguf") or not Path(source).is_file():
        raise InvalidParams("quantization", f"'gguf' loads a GGUF file's own quantized weights, but {model_dir} was "
                                            "not converted from a .gguf file; use 'int4' or 'int8'")
    if device.type != "cpu":
        raise InvalidParams("quantization", f"'gguf' weights run on CPU only (device is {device}); load the GGUF "
                                            "without quantization to run it in the model dtype")
    if sharded:
        raise InvalidParams("quantization", "'gguf' weights cannot be sharded yet; use tensor_parallel_size=1")
    return Path(source)


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's 16-byte runs: the low nibbles are weights 0..15, the high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_0(rows: np.ndarray) -> Blocks:
    blocks = rows.reshape(rows.shape[0], -1, 18)  # d (f16), 16 bytes of codes; w = (q - 8) * d
    d = _f16(blocks[..., 0:2]).squeeze(-1)
    return _nibbles(blocks[..., 2:]).reshape(rows.shape[0], -1), d, -8 * d


def _q4_1(rows: np.ndarray) -> Blocks:
    blocks = rows.reshape(rows.shape[0], -1, 20)  # d, m (f16), 16 bytes of codes; w = q * d + m
    d, m = _f16(blocks[..., 0:2]).squeeze(-1), _f16(blocks[..., 2:4]).squeeze(-1)
    return _nibbles(blocks[..., 4:]).reshape(rows.shape[0], -1), d, m


def _q4_k(rows: np.ndarray) -> Blocks:
    # 256-weight super-blocks: d, dmin (f16), 12 bytes packing eight 6-bit (scale, min) pairs, 128 bytes of codes
    # in four 32-byte runs whose low nibbles are sub-block 2j and high nibbles sub-block 2j + 1.
    n = rows.shape[0]
    blocks = rows.reshape(n, -1, 144)
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    packed = blocks[..., 4:16].astype(np.uint8)
    low, high = packed[..., 0:4], packed[..., 4:8]
    top = packed[..., 8:12]
    sc = np.concatenate([low & 63, (top & 0x0F) | ((low >> 6) << 4)], axis=-1)
    mn = np.concatenate([high & 63, (top >> 4) | ((high >> 6) << 4)], axis=-1)
    qs = blocks[..., 16:].reshape(n, -1, 4, 32)
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, -1)  # run j: sub-block 2j (low), 2j + 1 (high)
    return codes, (d * sc).reshape(n, -1), (-dmin * mn).reshape(n, -1)


def _q8_0(rows: np.ndarray) -> Blocks:
    blocks = rows.reshape(rows.shape[0], -1, 34)  # d (f16), 32 signed codes; w = q * d
    d = _f16(blocks[..., 0:2]).squeeze(-1)
    return blocks[..., 2:].copy().view(np.int8).reshape(rows.shape[0], -1), d, np.zeros_like(d)


_PARSERS: dict[str, Callable[[np.ndarray], Blocks]] = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q8_0": _q8_0}


def quantized_blocks(tensor: object) -> Blocks:
    """(codes, scales, offsets) of a GGUFReader tensor of a Q4 type (codes 0..15) or Q8_0 (int8 codes, offsets 0),
    rows as in the file ([out, in] of a Linear)."""
    rows = np.asarray(tensor.data, dtype=np.uint8)  # type: ignore[attr-defined]
    return _PARSERS[tensor.tensor_type.name](rows.reshape(rows.shape[0], -1))  # type: ignore[attr-defined]


def _unpermute_rows(num_rows: int, heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation (transformers' reverse_permute, applied to row indices)."""
    half = num_rows // heads // 2
    return np.arange(num_rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(num_rows)


def load_gguf_linears(model: nn.Module, gguf_path: Path, dtype: torch.dtype) -> dict[str, int]:
    """Give every Linear of `model` the packed form of its GGUF tensors; returns how many became each form."""
    import gguf

    from lmport.engine.models.layers import Linear
    from lmport.engine.models.llama import checkpoint_parts

    reader = gguf.GGUFReader(str(gguf_path))
    tensors = {t.name.removesuffix(".weight"): t for t in reader.tensors}
    arch_name = bytes(reader.fields["general.architecture"].parts[-1]).decode()

    def field(key: str, default: int | None = None) -> int:
        found = reader.fields.get(f"{arch_name}.{key}")
        return int(found.parts[-1][0]) if found is not None else int(default)  # type: ignore[arg-type]

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name)
    names = gguf.get_tensor_name_map(arch, field("block_count"))
    heads = {"q_proj": field("attention.head_count")}
    heads["k_proj"] = field("attention.head_count_kv", heads["q_proj"])

    def tensor_for(hf_name: str) -> object | None:
        found = tensors.get(names.get_name(hf_name) or "")
        return tensors.get("token_embd") if found is None and hf_name == "lm_head" else found  # tied embeddings

    counts = {"int4": 0, "int8": 0, "unchanged": 0}
    shared = shared_parameters(model)
    for module_name, module in model.named_modules():
        if not isinstance(module, Linear) or module.weight.numel() == 0:
            continue
        parts = [(hf_name, tensor_for(hf_name)) for hf_name in checkpoint_parts(module_name)]
        types = {t.tensor_type.name if t is not None else None for _, t in parts}  # type: ignore[attr-defined]
        out_features = module.weight.shape[0]
        if types <= set(Q4_TYPES) and out_features % 16 == 0:
            codes, scales, offsets = _blocks_of_parts(parts, arch_name, heads)
            attach_quantized(module, Int4Weight.from_codes(codes.to(torch.int32), scales, offsets, GROUP_SIZE, dtype),
                             shared)
            counts["int4"] += 1
        elif types == {"Q8_0"}:
            codes, scales, _ = _blocks_of_parts(parts, arch_name, heads)
            attach_quantized(module, Int8Weight.from_codes(codes, scales, dtype), shared)
            counts["int8"] += 1
        else:
            counts["unchanged"] += 1
    logger.info("quantization='gguf': %d Linears from the file's 4-bit codes, %d as int8 (Q8_0), %d unchanged",
                counts["int4"], counts["int8"], counts["unchanged"])
    return counts


def _blocks_of_parts(parts: list[tuple[str, object]], arch: str,
                     heads: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The codes, scales and offsets of a Linear's checkpoint parts (q, k, v of a fused qkv), rows in transformers'
    order, stacked."""
    codes, scales, offsets = [], [], []
    for hf_name, tensor in parts:
        c, s, o = quantized_blocks(tensor)
        leaf = hf_name.rpartition(".")[2]
        if arch in _PERMUTED_QK and leaf in heads:
            order = _unpermute_rows(c.shape[0], heads[leaf])
            c, s, o = c[order], s[order], o[order]
        codes.append(c)
        scales.append(s)
        offsets.append(o)
    return (torch.from_numpy(np.concatenate(codes)), torch.from_numpy(np.concatenate(scales)),
            torch.from_numpy(np.concatenate(offsets)))
