"""Meta's OPT (facebook/opt-125m ... 66b): learned absolute positions (offset by 2), LayerNorm before or after each
block (`do_layer_norm_before`; opt-350m is post-LN), a ReLU MLP (fc1/fc2), biases everywhere, and for opt-350m a
narrower word embedding projected in and out (`project_in` / `project_out`). No RoPE."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from lmport.engine.errors import UnsupportedModel
from lmport.engine.models.layers import Embedding, LayerNorm, Linear, PagedAttention
from lmport.engine.models.weights import load_checkpoint

POSITION_OFFSET = 2  # OPT's position table starts two rows in (a fairseq legacy)
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


class OPTAttention(nn.Module):
    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        hidden, heads, bias = hf_config.hidden_size, hf_config.num_attention_heads, hf_config.enable_bias
        self.hidden = hidden
        self.qkv_proj = Linear(hidden, [hidden] * 3, bias=bias)
        self.out_proj = Linear(hidden, [hidden], bias=bias)
        self.attn = PagedAttention(heads, heads, hidden // heads, scale=(hidden // heads) ** -0.5)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(self.hidden, dim=-1)
        return self.out_proj(self.attn(q, k, v))


class OPTDecoderLayer(nn.Module):
    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        hidden, bias = hf_config.hidden_size, hf_config.enable_bias
        self.pre_norm = hf_config.do_layer_norm_before
        self.self_attn = OPTAttention(hf_config)
        self.self_attn_layer_norm = LayerNorm(hidden, 1e-5)
        self.fc1 = Linear(hidden, [hf_config.ffn_dim], bias=bias)
        self.fc2 = Linear(hf_config.ffn_dim, [hidden], bias=bias)
        self.final_layer_norm = LayerNorm(hidden, 1e-5)
        self.activation = _ACTIVATIONS[hf_config.activation_function]

    def _block(self, hidden: torch.Tensor, norm: LayerNorm, branch) -> torch.Tensor:
        if self.pre_norm:
            return hidden + branch(norm(hidden))
        return norm(hidden + branch(hidden))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self._block(hidden, self.self_attn_layer_norm, self.self_attn)
        return self._block(hidden, self.final_layer_norm, lambda x: self.fc2(self.activation(self.fc1(x))))


class OPTDecoder(nn.Module):
    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        hidden, word_dim = hf_config.hidden_size, hf_config.word_embed_proj_dim
        self.embed_tokens = Embedding(hf_config.vocab_size, word_dim)
        self.embed_positions = Embedding(hf_config.max_position_embeddings + POSITION_OFFSET, hidden)
        self.project_in = Linear(word_dim, [hidden]) if word_dim != hidden else None
        self.project_out = Linear(hidden, [word_dim]) if word_dim != hidden else None
        self.layers = nn.ModuleList(OPTDecoderLayer(hf_config) for _ in range(hf_config.num_hidden_layers))
        has_final_norm = hf_config.do_layer_norm_before and not getattr(hf_config, "_remove_final_layer_norm", False)
        self.final_layer_norm = LayerNorm(hidden, 1e-5) if has_final_norm else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        hidden = hidden + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            hidden = layer(hidden)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        return hidden if self.project_out is None else self.project_out(hidden)


class OPTForCausalLM(nn.Module):
    def __init__(self, hf_config: PretrainedConfig, max_model_len: int | None = None) -> None:
        super().__init__()
        if not hf_config.layer_norm_elementwise_affine:
            raise UnsupportedModel("OPT with layer_norm_elementwise_affine=False is not supported")
        if hf_config.activation_function not in _ACTIVATIONS:
            raise UnsupportedModel(f"OPT activation_function {hf_config.activation_function!r} is not supported; "
                                   f"supported: {', '.join(_ACTIVATIONS)}")
        self.config = hf_config
        self.model = nn.Module()
        self.model.decoder = OPTDecoder(hf_config)
        self.lm_head = Linear(hf_config.word_embed_proj_dim, [hf_config.vocab_size])
        self.lm_head.weight = self.model.decoder.embed_tokens.weight  # always tied

    @staticmethod
    def max_context_len(hf_config: PretrainedConfig) -> int:
        return hf_config.max_position_embeddings  # the learned position table's length

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.decoder(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """transformers names tensors `model.decoder.*`; the hub's original checkpoints `decoder.*`."""
        def place(name: str) -> tuple[str, int | None] | None:
            if name == "lm_head.weight":
                return None  # tied to the embedding
            name = name if name.startswith("model.") else f"model.{name}"
            *prefix, proj, kind = name.split(".")
            if proj in _QKV:
                return ".".join([*prefix, "qkv_proj", kind]), _QKV[proj]
            return name, None

        load_checkpoint(self, weights, place)
