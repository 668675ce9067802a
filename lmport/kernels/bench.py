"""Triton attention benchmarks on a CUDA GPU.

Decode: achieved memory bandwidth (K/V bytes read / kernel time) against the device's measured copy bandwidth, at
several batch sizes and context lengths. Prefill: attention TFLOP/s (causal FLOPs only) against a measured dense
matmul rate in the same dtype. Every case is first checked against the PyTorch reference at a small size.

    python -m lmport.kernels.bench [--dtype bfloat16] [--batches 1,32,256] [--contexts 512,1024,2048,4096,8192] [--json F]

CUDA only: on a machine without a GPU it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(slots=True)
class Shape:
    q_heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _time_ms(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # flushes L2 before each run


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (_time_ms(lambda: dst.copy_(src)) * 1e-3)


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / (_time_ms(lambda: a @ b) * 1e-3)


def paged_cache(shape: Shape, seq_lens: list[int], device: torch.device):
    """Random K/V for each sequence in shuffled blocks; returns (k_cache, v_cache, block_tables, seq_lens)."""
    per_seq = [-(-n // shape.block_size) for n in seq_lens]
    num_blocks = sum(per_seq)
    order = torch.randperm(num_blocks, device=device).to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.int32, device=device)
    start = 0
    for s, count in enumerate(per_seq):
        tables[s, :count] = order[start:start + count]
        start += count
    cache_shape = (num_blocks, shape.block_size, shape.kv_heads, shape.head_dim)
    k_cache = torch.randn(cache_shape, device=device, dtype=shape.dtype)
    v_cache = torch.randn(cache_shape, device=device, dtype=shape.dtype)
    return k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32, device=device)


def check_against_reference(shape: Shape, device: torch.device) -> float:
    """Worst relative error of the Triton kernels vs the reference on a small mixed batch (refuses to bench if bad)."""
    from lmport.kernels import reference, triton_attention
    seq_lens = [1, 77, 300, 1000]
    k_cache, v_cache, tables, lens = paged_cache(shape, seq_lens, device)
    q = torch.randn(len(seq_lens), shape.q_heads, shape.head_dim, device=device, dtype=shape.dtype)
    worst = 0.0
    pairs = [(triton_attention.paged_attention_decode(q, k_cache, v_cache, tables, lens, shape.scale, num_splits=s),
              reference.paged_attention_decode(q, k_cache, v_cache, tables, lens, shape.scale)) for s in (1, 4)]
    q_lens = [1, 40, 300, 17]  # the rest of each sequence is cached context
    cu = torch.tensor([0] + q_lens, device=device).cumsum(0).to(torch.int32)
    qp = torch.randn(sum(q_lens), shape.q_heads, shape.head_dim, device=device, dtype=shape.dtype)
    args = (qp, k_cache, v_cache, cu, lens, tables, max(q_lens), shape.scale)
    pairs.append((triton_attention.paged_attention_prefill(*args), reference.paged_attention_prefill(*args)))
    for got, want in pairs:
        worst = max(worst, ((got.double() - want.double()).norm() / want.double().norm()).item())
    return worst


def bench_decode(shape: Shape, batch: int, context: int, device: torch.device) -> dict:
    from lmport.kernels import triton_attention
    k_cache, v_cache, tables, lens = paged_cache(shape, [context] * batch, device)
    q = torch.randn(batch, shape.q_heads, shape.head_dim, device=device, dtype=shape.dtype)
    ms = _time_ms(lambda: triton_attention.paged_attention_decode(q, k_cache, v_cache, tables, lens, shape.scale))
    element = k_cache.element_size()
    kv_bytes = 2 * batch * context * shape.kv_heads * shape.head_dim * element
    io_bytes = 2 * q.numel() * element + tables.numel() * 4
    splits = triton_attention.decode_num_splits(batch, shape.kv_heads, tables.shape[1] * shape.block_size,
                                                triton_attention.num_sms(device))
    return {"batch": batch, "context": context, "num_splits": splits, "ms": ms,
            "bytes_per_s": (kv_bytes + io_bytes) / (ms * 1e-3)}


def bench_prefill(shape: Shape, context: int, total_tokens: int, device: torch.device) -> dict:
    from lmport.kernels import triton_attention
    num_seqs = max(1, total_tokens // context)
    k_cache, v_cache, tables, lens = paged_cache(shape, [context] * num_seqs, device)
    cu = torch.arange(num_seqs + 1, device=device, dtype=torch.int32) * context
    q = torch.randn(num_seqs * context, shape.q_heads, shape.head_dim, device=device, dtype=shape.dtype)
    args = (q, k_cache, v_cache, cu, lens, tables, context, shape.scale)
    ms = _time_ms(lambda: triton_attention.paged_attention_prefill(*args))
    # QK^T and PV, 2 FLOPs per multiply-add, over the causal triangle (diagonal included)
    flops = num_seqs * 4 * shape.q_heads * shape.head_dim * context * (context + 1) / 2
    return {"num_seqs": num_seqs, "context": context, "ms": ms, "flops_per_s": flops / (ms * 1e-3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmport.kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--q-heads", type=int, default=32, help="query heads (default 32, Llama-3-8B)")
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads (default 8)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16, help="KV cache block size in tokens")
    parser.add_argument("--batches", type=_ints, default=[1, 32, 256], help="decode batch sizes (comma list)")
    parser.add_argument("--contexts", type=_ints, default=[512, 1024, 2048, 4096, 8192], help="context lengths")
    parser.add_argument("--prefill-tokens", type=int, default=16384, help="query tokens per prefill case")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("lmport.kernels.bench needs a CUDA GPU (none is visible here); the Triton kernels are verified on CPU by the "
              "interpreter tests instead: pytest tests/test_kernels_*.py", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    shape = Shape(args.q_heads, args.kv_heads, args.head_dim, args.block_size, DTYPES[args.dtype])
    torch.manual_seed(0)

    error = check_against_reference(shape, device)
    tolerance = 1e-5 if shape.dtype == torch.float32 else 1e-2
    print(f"# {torch.cuda.get_device_name(device)}, {args.dtype}, Hq={shape.q_heads} Hkv={shape.kv_heads} "
          f"D={shape.head_dim} block={shape.block_size}; Triton vs reference rel. error {error:.2e}")
    if error > tolerance:
        print(f"refusing to benchmark: error above {tolerance}", file=sys.stderr)
        return 1
    copy_bw = copy_bandwidth(device)
    mm_flops = matmul_flops(device, shape.dtype)
    print(f"device copy bandwidth {copy_bw / 1e9:.0f} GB/s; {args.dtype} matmul {mm_flops / 1e12:.0f} TFLOP/s\n")

    results: dict = {"device": torch.cuda.get_device_name(device), "shape": {**asdict(shape), "dtype": args.dtype},
                     "copy_bytes_per_s": copy_bw, "matmul_flops_per_s": mm_flops, "decode": [], "prefill": []}
    print("| decode batch | context | splits | time (us) | GB/s | % of copy |\n|---|---|---|---|---|---|")
    for batch in args.batches:
        for context in args.contexts:
            row = bench_decode(shape, batch, context, device)
            results["decode"].append(row)
            print(f"| {batch} | {context} | {row['num_splits']} | {row['ms'] * 1e3:.1f} | "
                  f"{row['bytes_per_s'] / 1e9:.0f} | {100 * row['bytes_per_s'] / copy_bw:.0f}% |", flush=True)
            torch.cuda.empty_cache()
    print("\n| prefill context | seqs | time (ms) | TFLOP/s | % of matmul |\n|---|---|---|---|---|")
    for context in args.contexts:
        row = bench_prefill(shape, context, args.prefill_tokens, device)
        results["prefill"].append(row)
        print(f"| {context} | {row['num_seqs']} | {row['ms']:.2f} | {row['flops_per_s'] / 1e12:.1f} | "
              f"{100 * row['flops_per_s'] / mm_flops:.0f}% |", flush=True)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
