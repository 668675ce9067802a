"""The hand-written AVX-512 int8 GEMV that docs/performance.md measured against torch's `_weight_int8pack_mm` and
dropped: it reads the bundled model's int8 weights no faster from memory at one activation row, and slower from four
rows up. Kept so the figures can be reproduced:

    .venv/bin/python docs/experiments/int8_gemv_avx512.py

Needs a CPU with AVX-512 (F, BW, VL) and a C++ compiler (torch's load_inline builds it). Not part of the package:
lmport's `int8` uses torch's kernel.

The kernel: each weight row's 16-byte chunks are widened to fp32 (`vpmovsxbd`, `vcvtdq2ps`) and multiplied into up to
four activation rows (converted to fp32 once per call), four weight rows at a time; the per-channel scale is applied
to the fp32 sum. The benchmark runs the 30 layers' projections and lm_head of the bundled model's shapes back to back,
on distinct random weights, so every call reads its weight from memory as in a decode step.
"""

import time

import torch
from torch.utils.cpp_extension import load_inline

CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <vector>

namespace {
inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
inline void from_float(float x, c10::BFloat16* dst) { *dst = c10::BFloat16(x); }


// dots[m * R + r] = sum_k xf[m, k] * w[r, k] for M <= 4 activation rows (fp32, row stride K) and R weight rows
template <int M, int R>
inline void int8_dots(const float* xf, int64_t K, const int8_t* w, float* dots) {
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    __m512 wv[R];
    for (int r = 0; r < R; ++r)
      wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w + r * K + k)));
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, xf + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) dots[m * R + r] = _mm512_reduce_add_ps(acc[m][r]);
}

template <int R>
inline void int8_dots_rows(int64_t M, const float* xf, int64_t K, const int8_t* w, float* dots) {
  switch (M) {
    case 1: int8_dots<1, R>(xf, K, w, dots); break;
    case 2: int8_dots<2, R>(xf, K, w, dots); break;
    case 3: int8_dots<3, R>(xf, K, w, dots); break;
    default: int8_dots<4, R>(xf, K, w, dots); break;
  }
}

template <typename scalar_t>
void int8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  std::vector<float> xf(M * K);
  for (int64_t m = 0; m < M; ++m) to_float(x.data_ptr<scalar_t>() + m * x.stride(0), xf.data() + m * K, K);
  const int8_t* wp = w.data_ptr<int8_t>();
  const scalar_t* sp = scales.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  constexpr int64_t R = 4;
  at::parallel_for(0, (N + R - 1) / R, 16, [&](int64_t begin, int64_t end) {
    float dots[4 * R];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * R, rows = std::min(R, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += 4) {  // the weight block stays in L1 for the next 4 activation rows
        const int64_t ms = std::min<int64_t>(4, M - m0);
        const float* xm = xf.data() + m0 * K;
        if (rows == R) {
          int8_dots_rows<R>(ms, xm, K, wp + n0 * K, dots);
        } else {
          for (int64_t r = 0; r < rows; ++r) {
            float one[4];
            int8_dots_rows<1>(ms, xm, K, wp + (n0 + r) * K, one);
            for (int64_t m = 0; m < ms; ++m) dots[m * R + r] = one[m];
          }
        }
        for (int64_t m = 0; m < ms; ++m)
          for (int64_t r = 0; r < rows; ++r)
            from_float(dots[m * R + r] * static_cast<float>(sp[n0 + r]), yp + (m0 + m) * N + n0 + r);
      }
    }
  });
}

}  // namespace

at::Tensor int8_gemv_bf16(at::Tensor x, at::Tensor weight, at::Tensor scales) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && weight.is_contiguous(), "bf16 x, int8 weight");
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  int8_gemv<c10::BFloat16>(x, weight, scales, y);
  return y;
}
"""

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # q|k|v, o, gate|up, down of SmolLM2-135M
LAYERS = 30
VOCAB = 49152


def main() -> None:
    mod = load_inline("lmport_int8_gemv_experiment", cpp_sources=[CPP_SOURCE], functions=["int8_gemv_bf16"],
                      extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    torch.set_num_threads(2)
    torch.manual_seed(0)
    layers = [[(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n).bfloat16() * 0.01)
               for n, k in SHAPES] for _ in range(LAYERS)]
    head = (torch.randint(-127, 128, (VOCAB, 576), dtype=torch.int8), torch.rand(VOCAB).bfloat16() * 0.01)
    weights = [pair for layer in layers for pair in layer] + [head]
    total_bytes = sum(w.numel() for w, _ in weights)
    kernels = {"own": mod.int8_gemv_bf16, "torch": torch.ops.aten._weight_int8pack_mm}
    for rows in (1, 2, 4, 8):
        xs = {k: torch.randn(rows, k).bfloat16() for k in (576, 1536)}
        for w, s in weights[:4] + [head]:  # same results up to summation order
            x = xs[w.shape[1]]
            own, ref = kernels["own"](x, w, s).float(), kernels["torch"](x, w, s).float()
            assert (own - ref).abs().max() <= 1e-2 * ref.abs().max(), "the kernel disagrees with torch's"
        times: dict[str, list[float]] = {name: [] for name in kernels}
        for _ in range(3):  # alternating A B A B
            for name, fn in kernels.items():
                for w, s in weights:  # warm-up pass
                    fn(xs[w.shape[1]], w, s)
                start = time.perf_counter()
                for _ in range(5):
                    for w, s in weights:
                        fn(xs[w.shape[1]], w, s)
                times[name].append((time.perf_counter() - start) / 5)
        best = {name: min(t) for name, t in times.items()}
        print(f"M={rows}: " + "  ".join(f"{name} {1e3 * t:.2f} ms/token ({total_bytes / t / 1e9:.1f} GB/s)"
                                        for name, t in best.items())
              + f"  own/torch speed {best['torch'] / best['own']:.2f}x")


if __name__ == "__main__":
    main()
