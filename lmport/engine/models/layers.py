"""Building blocks of the native models. Attention, KV-cache writes, norms, RoPE and the activation go through the
`kernels` API only; projections are plain torch matmuls.

Parameters are allocated with torch.empty (no random init: load_weights overwrites them), in the default dtype and
device the loader sets, and never require grad.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from lmport import kernels
from lmport.engine.errors import UnsupportedModel
from lmport.engine.forward_context import get_forward_context
from lmport.engine.quantization import Int4Weight, Int8Weight


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T (+ b). With several `output_sizes` it is a fused projection (q|k|v, gate|up): the checkpoint's
    separate matrices are loaded into row ranges of one weight, so the forward is a single matmul."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__()
        self.input_size, self.output_sizes = input_size, output_sizes
        self.shard_offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        self.weight = _param(sum(output_sizes), input_size)
        self.bias = _param(sum(output_sizes)) if bias else None
        self.packed: torch.Tensor | None = None  # oneDNN layout of weight, see pack_cpu_linears
        self.quantized: Int8Weight | Int4Weight | None = None  # see lmport.engine.quantization
        self.lora: nn.Module | None = None  # LoRA adapters' slots, once one targets this Linear (lmport.engine.lora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base(x)
        return y if self.lora is None else self.lora(x, y)

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            y = self.quantized.matmul(x)
            return y if self.bias is None else y + self.bias
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def pack_cpu_linears(model: nn.Module) -> int:
    """Pre-pack every bfloat16 CPU Linear weight into oneDNN's blocked layout, once.

    F.linear re-lays the weight out on every call, which costs as much as the matmul itself at decode batch sizes;
    the packed call gives bit-identical results about 1.5-2x faster. Plain weights are released afterwards unless
    another module shares them (tied embeddings). Returns the number of Linears packed (0 where oneDNN is absent).
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return 0
    shared = {id(p) for m in model.modules() if not isinstance(m, Linear) for p in m.parameters(recurse=False)}
    count = 0
    for module in model.modules():
        weight = module.weight if isinstance(module, Linear) else None
        if weight is None or weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.numel() == 0:
            continue
        module.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        if id(weight) not in shared:
            weight.data = weight.data.new_empty(0)
        count += 1
    return count


def _gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    # plain torch (no kernel): Gemma's only; F.gelu is one fused op on CPU and CUDA already
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


_GATED_ACTIVATIONS = {"silu": kernels.silu_and_mul, "gelu_pytorch_tanh": _gelu_tanh_and_mul,
                      "gelu_tanh": _gelu_tanh_and_mul}


def gated_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """act(x[:, :I]) * x[:, I:] for the config's activation name; UnsupportedModel names the others."""
    if name not in _GATED_ACTIVATIONS:
        raise UnsupportedModel(f"hidden activation {name!r} is not supported; supported: "
                               f"{', '.join(_GATED_ACTIVATIONS)}")
    return _GATED_ACTIVATIONS[name]


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = _param(num_embeddings, embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = _param(hidden_size)
        self.eps = eps

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual)."""
        return kernels.rms_norm(x, self.weight, self.eps, residual)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual), the add fused into the norm; the first layer (residual None) starts
        the residual stream with x."""
        return (self(x), x) if residual is None else self(x, residual)


def layer_sliding_window(hf_config: PretrainedConfig, layer_idx: int) -> int | None:
    """The attention window of layer `layer_idx`, or None for global attention: per `layer_types` where the config
    has them (Qwen2, Gemma, transformers 5), else the config's one `sliding_window` for every layer (Mistral)."""
    window = getattr(hf_config, "sliding_window", None)
    if getattr(hf_config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = _param(hidden_size), _param(hidden_size), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class PagedAttention(nn.Module):
    """Stores the step's K/V into this layer's paged cache and attends over it (decode rows first, then prefill).

    `k_cache` / `v_cache` ([num_blocks, block_size, num_kv_heads, head_dim]) are assigned by the model runner, and
    with them `k_scale` / `v_scale`, an fp8 cache's per-tensor scales (1.0 unless the checkpoint has its own).
    sliding_window: keys more than sliding_window - 1 positions back are not seen; soft_cap: Gemma 2's
    attn_logit_softcapping (see kernels.paged_attention_decode).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, soft_cap: float | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.sliding_window, self.soft_cap = sliding_window, soft_cap
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.k_scale = self.v_scale = 1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq*D], k/v [T, Hkv*D] -> [T, Hq*D]."""
        meta = get_forward_context()
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        kernels.store_kv_cache(k.view(num_tokens, self.num_kv_heads, self.head_dim),
                               v.view(num_tokens, self.num_kv_heads, self.head_dim),
                               self.k_cache, self.v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        num_decode = meta.num_decode_tokens
        parts = []
        if num_decode:
            parts.append(kernels.paged_attention_decode(q[:num_decode], self.k_cache, self.v_cache,
                                                        meta.decode_block_tables, meta.decode_seq_lens, self.scale,
                                                        self.sliding_window, self.soft_cap, self.k_scale,
                                                        self.v_scale))
        if num_decode < num_tokens:
            parts.append(kernels.paged_attention_prefill(q[num_decode:], self.k_cache, self.v_cache,
                                                         meta.prefill_cu_seqlens_q, meta.prefill_seq_lens,
                                                         meta.prefill_block_tables, meta.max_query_len, self.scale,
                                                         self.sliding_window, self.soft_cap, self.k_scale,
                                                        self.v_scale))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)


class RotaryEmbedding(nn.Module):
    """Holds the float32 cos/sin cache shared by every layer (one instance per model). A cache narrower than
    head_dim rotates only each head's leading channels (partial_rotary_factor); the rest pass through."""

    def __init__(self, cos_sin_cache: torch.Tensor, head_dim: int) -> None:
        super().__init__()
        self.head_dim, self.rotary_dim = head_dim, cos_sin_cache.shape[-1]
        self.register_buffer("cos_sin_cache", cos_sin_cache.to(torch.get_default_device()), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rotary_dim == self.head_dim:
            return kernels.rotary_embedding(positions, q, k, self.cos_sin_cache, self.head_dim)
        heads_q, heads_k = (x.view(x.shape[0], -1, self.head_dim) for x in (q, k))
        rot_q, rot_k = kernels.rotary_embedding(positions, heads_q[..., :self.rotary_dim].flatten(1),
                                                heads_k[..., :self.rotary_dim].flatten(1), self.cos_sin_cache,
                                                self.rotary_dim)
        return tuple(torch.cat((rot.view(x.shape[0], -1, self.rotary_dim), x[..., self.rotary_dim:]), -1).flatten(1)
                     for rot, x in ((rot_q, heads_q), (rot_k, heads_k)))
