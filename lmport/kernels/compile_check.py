"""Compile every Triton kernel ahead of time for a GPU target, with no GPU present.

The interpreter tests prove the kernels compute the right thing; this proves they also lower to GPU code (tensor-core
dots, cp.async pipelining of the K/V gathers) for the launch configurations the wrappers pick. The triton wheel ships
ptxas, so it runs on a CPU-only machine:

    python -m lmport.kernels.compile_check [--arch 90] [--verbose]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

if os.environ.get("TRITON_INTERPRET") == "1":  # interpreted kernels cannot be compiled
    sys.exit("lmport.kernels.compile_check: unset TRITON_INTERPRET (it compiles real GPU code)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lmport.kernels import triton_activation, triton_attention, triton_cache, triton_norm, triton_rope  # noqa: E402

TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Pointer arguments whose element type does not follow the activations.
FIXED_POINTERS = {"block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "cu_seqlens_q_ptr": "*i32",
                  "slot_mapping_ptr": "*i64", "positions_ptr": "*i64", "part_out_ptr": "*fp32",
                  "part_lse_ptr": "*fp32", "cos_sin_ptr": "*fp32"}
FLOAT_SCALARS = {"scale_log2", "eps"}


@dataclass(slots=True)
class Launch:
    kernel: triton.JITFunction
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int = 3


def launches(dtype: torch.dtype, head_dim: int = 128, group: int = 4, page: int = 16) -> Iterator[Launch]:
    """The launches the wrappers make for a Llama-8B-like layer (32 q heads, 8 KV heads)."""
    block_n, warps, stages = triton_attention._decode_config(dtype)
    for split in (False, True):  # the split count itself is a run-time argument
        yield Launch(triton_attention._decode_kernel,
                     dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_G=16, BLOCK_D=head_dim, BLOCK_N=block_n, PAGE=page,
                          SPLIT=split, DOT_F32=False), warps, stages)
    yield Launch(triton_attention._decode_reduce_kernel,
                 dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_N=block_n,
                      BLOCK_S=triton_attention._reduce_block_s(8)), 4)
    for dim in (64, head_dim):
        block_m, block_n, warps, stages = triton_attention._prefill_config(dim, dtype)
        yield Launch(triton_attention._prefill_kernel,
                     dict(GROUP=group, HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_D=dim, BLOCK_N=block_n, PAGE=page,
                          DOT_F32=False), warps, stages)
    yield Launch(triton_cache._store_kv_kernel, dict(HEAD_DIM=head_dim, PAGE=page, BLOCK_H=8, BLOCK_D=head_dim), 4)
    for residual in (False, True):
        yield Launch(triton_norm._rms_norm_kernel, dict(HAS_RESIDUAL=residual, BLOCK=4096), 16)
    yield Launch(triton_rope._rope_kernel, dict(HALF=head_dim // 2, BLOCK_HQ=32, BLOCK_HK=8,
                                                BLOCK_HALF=head_dim // 2), 4)
    yield Launch(triton_activation._silu_and_mul_kernel, dict(BLOCK=triton_activation.BLOCK), 4)


def compile_launch(launch: Launch, dtype: torch.dtype, target: GPUTarget) -> triton.compiler.CompiledKernel:
    names = launch.kernel.arg_names
    signature: dict[str, str] = {}
    constexprs: dict[tuple[int, ...], object] = {}
    for i, name in enumerate(names):
        if name in launch.constexprs:
            signature[name] = "constexpr"
            constexprs[(i,)] = launch.constexprs[name]
        elif name.endswith("_ptr"):
            signature[name] = FIXED_POINTERS.get(name, f"*{TRITON_DTYPE[dtype]}")
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    # What the launcher specialises at run time: tensors and strides are 16-aligned (torch allocations, D % 16 == 0).
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
             if name.endswith("_ptr") or name.startswith("stride")}
    source = ASTSource(launch.kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options={"num_warps": launch.num_warps,
                                                          "num_stages": launch.num_stages})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmport.kernels.compile_check", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90 (default 90)")
    parser.add_argument("--verbose", action="store_true", help="print shared memory and pipelining per kernel")
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    for dtype in TRITON_DTYPE:
        for launch in launches(dtype):
            compiled = compile_launch(launch, dtype, target)
            if args.verbose:
                ttgir = compiled.asm["ttgir"]
                print(f"sm_{args.arch} {TRITON_DTYPE[dtype]:4s} {launch.kernel.fn.__name__:24s} "
                      f"warps={launch.num_warps} smem={compiled.metadata.shared:6d} "
                      f"async_copies={ttgir.count('async_copy_global_to_local')} "
                      f"wgmma={'warp_group_dot' in ttgir}")
    print(f"all kernels compiled for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
