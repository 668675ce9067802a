"""Drives a native model through the paged path without the engine: owns a tiny KV cache and block allocator,
builds AttentionMetadata for mixed decode/prefill steps, and copies weights from an HF model."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmport.engine.forward_context import AttentionMetadata, forward_context
from lmport.engine.models.layers import PagedAttention


@dataclass
class PagedSeq:
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0


class PagedHarness:
    def __init__(self, model: nn.Module, block_size: int = 4, num_blocks: int = 96, seed: int = 0) -> None:
        self.model, self.block_size = model, block_size
        layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
        weight = next(model.parameters())
        self.device = weight.device  # the cache and every input tensor live where the model does
        shape = (num_blocks, block_size, layers[0].num_kv_heads, layers[0].head_dim)
        for layer in layers:
            layer.k_cache, layer.v_cache = (torch.zeros(shape, dtype=weight.dtype, device=self.device)
                                            for _ in range(2))
        self.layers = layers
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)  # scattered blocks: block tables must really be followed

    def _slot(self, seq: PagedSeq, position: int) -> int:
        while len(seq.block_table) * self.block_size <= position:
            seq.block_table.append(self.free_blocks.pop())
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def prepare(self, work: list[tuple[PagedSeq, list[int]]]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                                      list[int], list[int]]:
        """One batch's model inputs: (input_ids, positions, metadata, order, cu) where decodes (one token after
        context) come first, as the engine orders them; row range cu[k]..cu[k+1] belongs to work[order[k]]."""
        is_decode = [seq.num_computed > 0 and len(tokens) == 1 for seq, tokens in work]
        order = [i for i in range(len(work)) if is_decode[i]] + [i for i in range(len(work)) if not is_decode[i]]
        ids, positions, slots, seq_lens, cu = [], [], [], [], [0]
        for i in order:
            seq, tokens = work[i]
            start = seq.num_computed
            ids += tokens
            positions += range(start, start + len(tokens))
            slots += [self._slot(seq, p) for p in range(start, start + len(tokens))]
            seq_lens.append(start + len(tokens))
            cu.append(len(ids))
        num_decode = sum(is_decode)
        width = max(len(work[i][0].block_table) for i in order)
        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        tables = tensor([work[i][0].block_table + [0] * (width - len(work[i][0].block_table)) for i in order],
                        torch.int32)
        lens = tensor(seq_lens, torch.int32)
        meta = AttentionMetadata(
            slot_mapping=tensor(slots, torch.int64), num_decode_tokens=num_decode,
            decode_block_tables=tables[:num_decode], decode_seq_lens=lens[:num_decode],
            prefill_cu_seqlens_q=tensor([c - cu[num_decode] for c in cu[num_decode:]], torch.int32),
            prefill_seq_lens=lens[num_decode:], prefill_block_tables=tables[num_decode:],
            max_query_len=max(len(work[i][1]) for i in order))
        for seq, tokens in work:
            seq.num_computed += len(tokens)
        return tensor(ids, torch.int64), tensor(positions, torch.int64), meta, order, cu

    def caches(self) -> list[torch.Tensor]:
        """Every layer's K and V cache, in layer order."""
        return [cache for layer in self.layers for cache in (layer.k_cache, layer.v_cache)]

    @torch.inference_mode()
    def rewound_forward(self, ids: torch.Tensor, positions: torch.Tensor,
                        meta: AttentionMetadata) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The modules' hidden states for one prepared step, then the caches put back as they were, so that another
        path can run the same step: (hidden, copies of the caches before, copies of the caches after)."""
        before = [c.clone() for c in self.caches()]
        with forward_context(meta):
            hidden = self.model(ids, positions)
        after = [c.clone() for c in self.caches()]
        for cache, saved in zip(self.caches(), before):
            cache.copy_(saved)
        return hidden, before, after

    @torch.inference_mode()
    def step(self, work: list[tuple[PagedSeq, list[int]]]) -> list[torch.Tensor]:
        """Run one batch: each (seq, new tokens). Returns float32 logits [len(new tokens), vocab] per work item, in
        the given order."""
        ids, positions, meta, order, cu = self.prepare(work)
        with forward_context(meta):
            hidden = self.model(ids, positions)
        logits = self.model.compute_logits(hidden).float()
        out: list[torch.Tensor] = [torch.empty(0)] * len(work)
        for row, i in enumerate(order):
            out[i] = logits[cu[row]:cu[row + 1]]
        return out


# --- tiny on-disk models for the loader tests ---

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


MERGES = [("h", "e")]


def byte_level_vocab() -> list[str]:
    """The 256 byte-level BPE symbols, one merge, then the special tokens: every text encodes."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return list(bytes_to_unicode().values()) + ["".join(m) for m in MERGES] + SPECIAL_TOKENS


def tiny_llama(vocab_size: int = 260, seed: int = 0, **overrides: object) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig
    config = LlamaConfig(**{"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 96,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                            "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "initializer_range": 0.2,
                            "bos_token_id": 258, "eos_token_id": 259, "pad_token_id": 257, **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def write_tiny_model_dir(path: Path, max_shard_size: str | None = None, **overrides: object) -> nn.Module:
    """A complete HF model directory (config, generation config, byte-level tokenizer with chat template,
    fp32 safetensors); returns the HF model it holds."""
    hf = tiny_llama(**overrides)
    hf.config.dtype = torch.float32
    hf.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    save_tokenizer(path)
    return hf


def save_tokenizer(path: Path) -> None:
    """The byte-level BPE tokenizer (vocab 260) with a chat template, saved the way HF saves one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(byte_level_vocab())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)


def write_tiny_gguf(path: Path, hf: nn.Module, linear_types: dict[str, str] | None = None) -> None:
    """Write `hf` (a tiny LlamaForCausalLM) as a GGUF the way llama.cpp's converter does, q/k rows permuted: F32,
    except the projections `linear_types` maps (GGUF name such as "attn_q" or "output" -> "Q4_0" / "Q4_1" / "Q8_0",
    quantized by gguf-py)."""
    import gguf
    import numpy as np

    cfg = hf.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads

    def permute(w: np.ndarray, n: int) -> np.ndarray:  # llama.cpp's interleaved rotary layout
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens = byte_level_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - len(SPECIAL_TOKENS)) + [3] * len(SPECIAL_TOKENS))
    writer.add_token_merges([" ".join(m) for m in MERGES])
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_chat_template(CHAT_TEMPLATE)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "q_proj": "attn_q", "k_proj": "attn_k",
             "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
             "down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, tensor in hf.state_dict().items():
        array = tensor.float().numpy()
        parts = name.removeprefix("model.").split(".")
        if parts[0] == "lm_head":
            gguf_name = "output.weight"
        elif parts[0] == "layers":
            gguf_name = f"blk.{parts[1]}.{names[parts[-2]]}.{parts[-1]}"
            if parts[-2] in ("q_proj", "k_proj"):
                array = permute(array, heads if parts[-2] == "q_proj" else kv_heads)
        else:
            gguf_name = f"{names[parts[0]]}.{parts[-1]}"
        qtype = (linear_types or {}).get(gguf_name.split(".")[-2])
        if qtype is None:
            writer.add_tensor(gguf_name, np.ascontiguousarray(array))
        else:
            raw_type = getattr(gguf.GGMLQuantizationType, qtype)
            writer.add_tensor(gguf_name, gguf.quants.quantize(np.ascontiguousarray(array), raw_type),
                              raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
