"""W4A8 on AVX-512 VNNI: int4 weight codes times int8-quantized activations with `vpdpbusd`, against torch's
`_weight_int4pack_mm_for_cpu` (which widens the codes and multiplies in floating point). Reproduce:

    .venv/bin/python docs/experiments/int4_vnni_gemv.py

The kernel is lmport.kernels.cpu_int4 (this script times the package's own build of it). The layout: weight rows in tiles of 4; per tile and 64 input channels, 4 x 32 bytes, byte j of a row holding the
code of channel j in its low nibble and of channel j + 32 in its high one, so one 32-byte load unpacks into 64 codes
in channel order. Activations are quantized per row and per 32 channels to int8 (scale = max |x| / 127), as llama.cpp
quantizes activations for its Q4 / Q8 dot products; the group offsets are applied through per-32 sums of the exact
activations.
"""

import time

import torch

from lmport.engine.quantization import Int4Weight, pack_int4
from lmport.kernels import cpu


def bench(fn, n: int = 100) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    assert cpu.int4_matmul_supported(), "needs lmport's CPU kernels built for AVX-512 VNNI"
    torch.manual_seed(0)
    torch.set_num_threads(2)
    shapes = ((960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576))
    for M in (1, 2, 4, 8, 32):
        totals = [0.0, 0.0]
        for N, K in shapes:
            w = torch.randn(N, K, dtype=torch.bfloat16)
            groups = w.float().reshape(N, K // 32, 32)
            low, high = groups.amin(-1), groups.amax(-1)
            s = ((high - low) / 15).clamp(min=1e-30)
            q = torch.clamp(torch.round((groups - low[..., None]) / s[..., None]), 0, 15).reshape(N, K)
            ref = Int4Weight.from_codes(q.to(torch.int32), s, low, 32, torch.float32)  # torch's kernel
            ref.scales = ref.scales.to(torch.bfloat16)
            deq = (q.reshape(N, K // 32, 32) * s[..., None] + low[..., None]).reshape(N, K)
            P, S, O = pack_int4(q, s, low)
            x = torch.randn(M, K, dtype=torch.bfloat16)
            exact = x.float() @ deq.T
            err = ((cpu.int4_matmul(x, P, S, O).float() - exact).abs().max() / exact.abs().max()).item()
            err_torch = ((ref.matmul(x).float() - exact).abs().max() / exact.abs().max()).item()
            calls = 20 if N > 10000 else 300
            own, theirs = bench(lambda: cpu.int4_matmul(x, P, S, O), calls), bench(lambda: ref.matmul(x), calls)
            weight = 30 if N < 10000 else 1  # a decode step: 30 layers of each projection, one lm_head
            totals[0] += own * weight
            totals[1] += theirs * weight
            print(f"M={M} N={N} K={K}: max rel. error own {err:.1e}, torch {err_torch:.1e}; own {own * 1e6:.1f} us, "
                  f"torch {theirs * 1e6:.1f} us, own/torch speed {theirs / own:.2f}x")
        print(f"M={M} a token's matmuls: own {totals[0] * 1e3:.2f} ms, torch {totals[1] * 1e3:.2f} ms, "
              f"{totals[1] / totals[0]:.2f}x")


if __name__ == "__main__":
    main()
