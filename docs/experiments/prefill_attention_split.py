"""Where the reference prefill attention's time goes on CPU, per layer of the bundled model's shape (9 query heads, 3
KV heads, head_dim 64, block 16, bf16), for 8 prompts of 32, 128 and 512 tokens:

    .venv/bin/python docs/experiments/prefill_attention_split.py

- "C++ kernel": `lmport.kernels.cpu.paged_attention_prefill`, the kernel lmport runs on CPU (docs/kernels.md);
- "reference": `lmport.kernels.reference.paged_attention_prefill` (gather each sequence's K/V blocks, one SDPA each);
- "SDPA per sequence": the SDPA calls alone, on K/V already contiguous;
- "SDPA batched": one SDPA call over all 8 sequences (possible when every prompt has the same length);
- "gathers": the block gathers alone.

It first measured whether batching the per-sequence calls or skipping the gathers would pay (docs/performance.md).
Neither does: torch's flash SDPA is about 95 % of the reference's time at 128-512 tokens, and one batched call costs
the same as eight. Hence the C++ kernel, which skips the masked half instead.
"""

import time

import torch
import torch.nn.functional as F

from lmport.kernels import cpu, reference

HEADS, KV_HEADS, HEAD_DIM, BLOCK, PROMPTS, ROUNDS = 9, 3, 64, 16, 8, 20


def time_ms(fn) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(ROUNDS):
        fn()
    return (time.perf_counter() - start) / ROUNDS * 1e3


def main() -> None:
    torch.manual_seed(0)
    for length in (32, 128, 512):
        blocks_per_seq = length // BLOCK + 1
        num_blocks = PROMPTS * blocks_per_seq + 1
        k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        tables = torch.randperm(num_blocks - 1)[:PROMPTS * blocks_per_seq].add(1).view(PROMPTS, -1).int()
        q = torch.randn(PROMPTS * length, HEADS, HEAD_DIM, dtype=torch.bfloat16)
        cu_seqlens = torch.arange(0, PROMPTS * length + 1, length, dtype=torch.int32)
        seq_lens = torch.full((PROMPTS,), length, dtype=torch.int32)
        keys = torch.randn(PROMPTS, KV_HEADS, length, HEAD_DIM, dtype=torch.bfloat16)
        values = torch.randn_like(keys)
        queries = q.view(PROMPTS, length, HEADS, HEAD_DIM).transpose(1, 2)

        def sdpa(lo: int, hi: int) -> torch.Tensor:
            return F.scaled_dot_product_attention(queries[lo:hi], keys[lo:hi], values[lo:hi], is_causal=True,
                                                  scale=0.125, enable_gqa=True)

        cases = {
            "C++ kernel": lambda: cpu.paged_attention_prefill(q, k_cache, v_cache, cu_seqlens, seq_lens, tables,
                                                              length, 0.125),
            "reference": lambda: reference.paged_attention_prefill(q, k_cache, v_cache, cu_seqlens, seq_lens,
                                                                   tables, length, 0.125),
            "SDPA per sequence": lambda: [sdpa(s, s + 1) for s in range(PROMPTS)],
            "SDPA batched": lambda: sdpa(0, PROMPTS),
            "gathers": lambda: [reference._gather_blocks(cache, tables[s:s + 1], torch.bfloat16)
                                for s in range(PROMPTS) for cache in (k_cache, v_cache)],
        }
        print(f"{PROMPTS} prompts x {length} tokens: " + ", ".join(
            f"{name} {time_ms(fn):.2f} ms" for name, fn in cases.items()) + " (a layer)")


if __name__ == "__main__":
    main()
