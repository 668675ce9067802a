"""The hand-written AVX-512 BF16 int4 GEMV that docs/performance.md measured against torch's
`_weight_int4pack_mm_for_cpu` and dropped (0.52-1.02x torch's speed). Kept so the figures can be reproduced:

    .venv/bin/python docs/experiments/int4_gemv_avx512.py

Needs a CPU with AVX-512 BF16 and a C++ compiler (the extension is built with torch's load_inline). Not part of the
package: lmport's `int4` uses torch's kernel.

The layout: each row's codes in chunks of 128 (64 bytes), which one `_mm512_unpack{lo,hi}_epi8` against 0x43 turns
into four vectors of 32 bf16 values 128 + q in natural k order (a last chunk of 64 codes uses the low halves). A
group of 32 is one `vdpbf16ps`; its scale is applied by an FMA; the zero points, with the 128 bias folded in
(offset - 128 * scale), are applied through per-group sums of the activations.
"""

import time

import torch
from torch.utils.cpp_extension import load_inline

from lmport.engine.quantization import Int4Weight

CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>

namespace {
// 64 bytes hold 128 codes as 4 vectors of 32 bf16 (128 + code: 0x43 as the high byte), see pack order in Python.
inline void unpack4(__m512i v, __m512i& w0, __m512i& w1, __m512i& w2, __m512i& w3) {
  const __m512i lowmask = _mm512_set1_epi8(0x0F);
  const __m512i c43 = _mm512_set1_epi8(0x43);
  __m512i lo = _mm512_and_si512(v, lowmask);
  __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), lowmask);
  w0 = _mm512_unpacklo_epi8(lo, c43);
  w1 = _mm512_unpackhi_epi8(lo, c43);
  w2 = _mm512_unpacklo_epi8(hi, c43);
  w3 = _mm512_unpackhi_epi8(hi, c43);
}
inline __m512 dp(__m512i w, __m512i x) {
  return _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w, (__m512bh)x);
}
constexpr int MB = 4;  // activation rows sharing one unpack of the weights
}

at::Tensor int4_gemm(at::Tensor x, at::Tensor packed, at::Tensor scales, at::Tensor offsets) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(), "x: contiguous bf16 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(K % 64 == 0 && packed.size(1) == K / 2, "K must divide by 64");
  const int64_t G = K / 32, main_k = K / 128 * 128;
  at::Tensor xs = x.to(at::kFloat).view({M, G, 32}).sum(-1).contiguous();  // [M, G]
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* P = packed.data_ptr<uint8_t>();
  const float* S = scales.data_ptr<float>();
  const float* O = offsets.data_ptr<float>();
  const uint16_t* X = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const float* XS = xs.data_ptr<float>();
  at::BFloat16* Y = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = P + n * (K / 2);
      const float* s = S + n * G;
      const float* o = O + n * G;
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int mb = (int)std::min<int64_t>(MB, M - m0);
        __m512 acc[MB];
        for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k < main_k; k += 128) {
          __m512i w0, w1, w2, w3;
          unpack4(_mm512_loadu_si512(row + k / 2), w0, w1, w2, w3);
          const int64_t g = k / 32;
          const __m512 s0 = _mm512_set1_ps(s[g]), s1 = _mm512_set1_ps(s[g + 1]),
                       s2 = _mm512_set1_ps(s[g + 2]), s3 = _mm512_set1_ps(s[g + 3]);
          for (int i = 0; i < mb; ++i) {
            const uint16_t* xk = X + (m0 + i) * K + k;
            acc[i] = _mm512_fmadd_ps(dp(w0, _mm512_loadu_si512(xk)), s0, acc[i]);
            acc[i] = _mm512_fmadd_ps(dp(w1, _mm512_loadu_si512(xk + 32)), s1, acc[i]);
            acc[i] = _mm512_fmadd_ps(dp(w2, _mm512_loadu_si512(xk + 64)), s2, acc[i]);
            acc[i] = _mm512_fmadd_ps(dp(w3, _mm512_loadu_si512(xk + 96)), s3, acc[i]);
          }
        }
        if (k < K) {  // a last 64 codes in 32 bytes: each vector holds 16 codes in its low half
          __m512i w0, w1, w2, w3;
          unpack4(_mm512_maskz_loadu_epi8(0xFFFFFFFFull, row + k / 2), w0, w1, w2, w3);
          const int64_t g = k / 32;
          const __m512 s0 = _mm512_set1_ps(s[g]), s1 = _mm512_set1_ps(s[g + 1]);
          for (int i = 0; i < mb; ++i) {
            const uint16_t* xk = X + (m0 + i) * K + k;
            __m512 a = _mm512_add_ps(dp(w0, _mm512_maskz_loadu_epi16(0xFFFF, xk)),
                                     dp(w1, _mm512_maskz_loadu_epi16(0xFFFF, xk + 16)));
            __m512 b = _mm512_add_ps(dp(w2, _mm512_maskz_loadu_epi16(0xFFFF, xk + 32)),
                                     dp(w3, _mm512_maskz_loadu_epi16(0xFFFF, xk + 48)));
            acc[i] = _mm512_fmadd_ps(b, s1, _mm512_fmadd_ps(a, s0, acc[i]));
          }
        }
        for (int i = 0; i < mb; ++i) {
          float r = _mm512_reduce_add_ps(acc[i]);
          const float* xsm = XS + (m0 + i) * G;
          for (int64_t g = 0; g < G; ++g) r += o[g] * xsm[g];
          Y[(m0 + i) * N + n] = at::BFloat16(r);
        }
      }
    }
  });
  return y;
}
"""


def code_positions(k_total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte (within a row) and nibble (0 low, 1 high) that hold each k, matching the unpack in CPP_SOURCE."""
    byte, nibble = torch.empty(k_total, dtype=torch.long), torch.empty(k_total, dtype=torch.long)
    main = k_total // 128 * 128
    for k in range(k_total):
        if k < main:
            chunk, i = divmod(k, 128)
            vector, within = divmod(i, 32)
            base = 64 * chunk
        else:
            vector, within = divmod(k - main, 16)
            base = main // 2
        lane, t = divmod(within, 8)
        byte[k] = base + 16 * lane + t + (8 if vector % 2 else 0)
        nibble[k] = 0 if vector < 2 else 1
    return byte, nibble


def pack(codes: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape
    byte, nibble = code_positions(k)
    out = torch.zeros(n, k // 2, dtype=torch.int32)
    out.index_add_(1, byte, (codes.to(torch.int32) << (4 * nibble).to(torch.int32)).to(torch.int32))
    return out.to(torch.uint8)


def bench(fn, n: int = 100) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    mod = load_inline("lmport_int4_gemv_experiment", cpp_sources=[CPP_SOURCE], functions=["int4_gemm"],
                      extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    torch.manual_seed(0)
    torch.set_num_threads(2)
    for N, K in ((960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)):
        w = torch.randn(N, K, dtype=torch.bfloat16)
        ref = Int4Weight.quantize(w, 32)
        groups = w.float().reshape(N, K // 32, 32)
        low, high = groups.amin(-1), groups.amax(-1)
        s = ((high - low) / 15).clamp(min=1e-30)
        q = torch.clamp(torch.round((groups - low[..., None]) / s[..., None]), 0, 15).reshape(N, K)
        deq = (q.reshape(N, K // 32, 32) * s[..., None] + low[..., None]).reshape(N, K)
        P, S, O = pack(q), s.contiguous(), (low - 128 * s).contiguous()
        for M in (1, 8):
            x = torch.randn(M, K, dtype=torch.bfloat16)
            exact = x.float() @ deq.T
            err = ((mod.int4_gemm(x, P, S, O).float() - exact).abs().max() / exact.abs().max()).item()
            err_torch = ((ref.matmul(x).float() - exact).abs().max() / exact.abs().max()).item()
            calls = 20 if N > 10000 else 200
            own, theirs = bench(lambda: mod.int4_gemm(x, P, S, O), calls), bench(lambda: ref.matmul(x), calls)
            print(f"N={N} K={K} M={M}: max rel. error own {err:.1e}, torch {err_torch:.1e}; "
                  f"own {own * 1e6:.1f} us, torch {theirs * 1e6:.1f} us, own/torch speed {theirs / own:.2f}x")


if __name__ == "__main__":
    main()
