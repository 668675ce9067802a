"""BERT-style encoder (all-MiniLM-L6-v2, BGE, E5 and the other BertModel sentence-embedding checkpoints).

Encoders attend bidirectionally over one whole input and never decode, so they run without the paged KV cache: a
plain right-padded batch [B, L] with an attention mask through torch's scaled_dot_product_attention. Only the
embedding path uses them (EncoderEngine); q/k/v are fused like the decoders' and loaded by load_checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from lmport.engine.errors import UnsupportedModel
from lmport.engine.models.layers import Embedding, LayerNorm, Linear
from lmport.engine.models.weights import load_checkpoint

_ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
_QKV = {"query": 0, "key": 1, "value": 2}


class BertEmbeddings(nn.Module):
    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        hidden = hf_config.hidden_size
        self.word_embeddings = Embedding(hf_config.vocab_size, hidden)
        self.position_embeddings = Embedding(hf_config.max_position_embeddings, hidden)
        self.token_type_embeddings = Embedding(hf_config.type_vocab_size, hidden)
        self.LayerNorm = LayerNorm(hidden, hf_config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # Every input is one segment: token type 0, as sentence-transformers encodes single texts.
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertAttention(nn.Module):
    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        hidden = hf_config.hidden_size
        self.num_heads = hf_config.num_attention_heads
        self.qkv_proj = Linear(hidden, [hidden, hidden, hidden], bias=True)
        self.output = _DenseNorm(hidden, hidden, hf_config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape
        q, k, v = (t.view(batch, length, self.num_heads, -1).transpose(1, 2)
                   for t in self.qkv_proj(hidden).chunk(3, dim=-1))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.output(attended.transpose(1, 2).reshape(batch, length, width), hidden)


class _DenseNorm(nn.Module):
    """LayerNorm(dense(x) + residual): BERT's attention output and layer output."""

    def __init__(self, input_size: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = Linear(input_size, [hidden], bias=True)
        self.LayerNorm = LayerNorm(hidden, eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Intermediate(nn.Module):
    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        self.dense = Linear(hf_config.hidden_size, [hf_config.intermediate_size], bias=True)
        self.act = _ACTIVATIONS[hf_config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        self.attention = BertAttention(hf_config)
        self.intermediate = _Intermediate(hf_config)
        self.output = _DenseNorm(hf_config.intermediate_size, hf_config.hidden_size, hf_config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.attention(hidden, mask)
        return self.output(self.intermediate(hidden), hidden)


class _Encoder(nn.Module):
    def __init__(self, hf_config: PretrainedConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(hf_config) for _ in range(hf_config.num_hidden_layers))


class BertModel(nn.Module):
    is_encoder = True  # served by EncoderEngine: embeddings only, no KV cache

    def __init__(self, hf_config: PretrainedConfig, max_model_len: int | None = None) -> None:
        super().__init__()
        act = getattr(hf_config, "hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise UnsupportedModel(f"hidden_act {act!r} is not supported by BertModel ({', '.join(_ACTIVATIONS)})")
        if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
            raise UnsupportedModel("BertModel supports only position_embedding_type 'absolute', got "
                                   f"{hf_config.position_embedding_type!r}")
        self.config = hf_config
        self.embeddings = BertEmbeddings(hf_config)
        self.encoder = _Encoder(hf_config)

    @staticmethod
    def max_context_len(hf_config: PretrainedConfig) -> int:
        return hf_config.max_position_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] (right-padded), attention_mask [B, L] (1 = token) -> last hidden states [B, L, H]."""
        mask = attention_mask.bool()[:, None, None, :]  # padding is never attended to
        hidden = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            hidden = layer(hidden, mask)
        return hidden

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def place(name: str) -> tuple[str, int | None] | None:
            name = name.removeprefix("bert.")  # BertFor* checkpoints nest the encoder under "bert."
            # The pooler (a tanh over [CLS]) and position_ids are not part of the sentence-embedding path.
            if name.startswith(("pooler.", "cls.")) or name.endswith("position_ids"):
                return None
            *prefix, block, proj, kind = name.split(".")
            if block == "self" and proj in _QKV:  # encoder.layer.N.attention.self.query.weight -> the fused qkv_proj
                return ".".join([*prefix, "qkv_proj", kind]), _QKV[proj]
            return name, None

        load_checkpoint(self, weights, place)
