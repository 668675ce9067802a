"""W4A8 on AVX-512 VNNI: int4 weight codes times int8-quantized activations with `vpdpbusd`, against torch's
`_weight_int4pack_mm_for_cpu` (which widens the codes and multiplies in floating point). Reproduce:

    .venv/bin/python docs/experiments/int4_vnni_gemv.py

The layout: weight rows in tiles of 4; per tile and 64 input channels, 4 x 32 bytes, byte j of a row holding the
code of channel j in its low nibble and of channel j + 32 in its high one, so one 32-byte load unpacks into 64 codes
in channel order. Activations are quantized per row and per 32 channels to int8 (scale = max |x| / 127), as llama.cpp
quantizes activations for its Q4 / Q8 dot products; the group offsets are applied through per-32 sums of the exact
activations.
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
#include <vector>

namespace {
constexpr int TILE = 4;  // weight rows sharing each activation load
constexpr int MB = 4;    // activation rows sharing each unpack of the weights

inline __m512i unpack64(const uint8_t* p) {  // 32 bytes -> 64 codes 0..15, channel order
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}
inline __m512 pair(const float* p, __m512i idx) {  // lanes 0-7 p[0], lanes 8-15 p[1]
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_castsi128_ps(_mm_loadl_epi64(
      reinterpret_cast<const __m128i*>(p)))));
}

// x bf16 [M, K] -> int8 codes [M, K], scales [M, K/32], exact sums [M, K/32]
void quantize_rows(const at::BFloat16* x, int64_t M, int64_t K, int8_t* q, float* s, float* sums) {
  const int64_t B = K / 32;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < B; ++b) {
      const uint16_t* src = reinterpret_cast<const uint16_t*>(x + m * K + b * 32);
      const __m512i raw = _mm512_loadu_si512(src);
      const __m512 f0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), 16));
      const __m512 f1 = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(raw, 1)), 16));
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(f0), _mm512_abs_ps(f1)));
      const float scale = amax / 127.0f;
      const __m512 inv = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
      const __m128i q0 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(f0, inv)));
      const __m128i q1 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(f1, inv)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + m * K + b * 32), q0);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + m * K + b * 32 + 16), q1);
      s[m * B + b] = scale;
      sums[m * B + b] = _mm512_reduce_add_ps(_mm512_add_ps(f0, f1));
    }
}
}  // namespace

// packed uint8 [N/4, K/64, 4, 32]; scales float [N/4, K/64, 4, 2]; mins float [N/4, K/32, 4]
at::Tensor w4a8_gemm(at::Tensor x, at::Tensor packed, at::Tensor scales, at::Tensor mins) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(), "x: contiguous bf16 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), tiles = packed.size(0), N = tiles * TILE, C = K / 64, B = K / 32;
  TORCH_CHECK(K % 64 == 0 && packed.size(1) == C, "K must divide by 64");
  std::vector<int8_t> qx(M * K);
  std::vector<float> sx(M * B), xsum(M * B);
  quantize_rows(x.data_ptr<at::BFloat16>(), M, K, qx.data(), sx.data(), xsum.data());
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* P = packed.data_ptr<uint8_t>();
  const float* S = scales.data_ptr<float>();
  const float* MN = mins.data_ptr<float>();
  at::BFloat16* Y = y.data_ptr<at::BFloat16>();
  const int threads = at::get_num_threads();
  at::parallel_for(0, tiles, (tiles + threads - 1) / threads, [&](int64_t t0, int64_t t1) {
    const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* wt = P + t * C * TILE * 32;
      const float* st = S + t * C * TILE * 2;
      const float* mt = MN + t * B * TILE;
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int mb = (int)std::min<int64_t>(MB, M - m0);
        __m512 acc[MB][TILE];
        for (int i = 0; i < MB; ++i)
          for (int r = 0; r < TILE; ++r) acc[i][r] = _mm512_setzero_ps();
        for (int64_t c = 0; c < C; ++c) {
          __m512i w[TILE];
          __m512 sw[TILE];
          for (int r = 0; r < TILE; ++r) {
            w[r] = unpack64(wt + (c * TILE + r) * 32);
            sw[r] = pair(st + (c * TILE + r) * 2, idx);
          }
          for (int i = 0; i < mb; ++i) {
            const int64_t m = m0 + i;
            const __m512i xq = _mm512_loadu_si512(qx.data() + m * K + c * 64);
            const __m512 sxv = pair(sx.data() + m * B + 2 * c, idx);
            for (int r = 0; r < TILE; ++r) {
              const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[r], xq);
              acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sw[r], sxv), acc[i][r]);
            }
          }
        }
        for (int i = 0; i < mb; ++i) {
          const int64_t m = m0 + i;
          __m128 off = _mm_setzero_ps();
          for (int64_t b = 0; b < B; ++b)
            off = _mm_fmadd_ps(_mm_loadu_ps(mt + b * TILE), _mm_set1_ps(xsum[m * B + b]), off);
          alignas(16) float o[TILE];
          _mm_store_ps(o, off);
          for (int r = 0; r < TILE; ++r)
            Y[m * N + t * TILE + r] = at::BFloat16(_mm512_reduce_add_ps(acc[i][r]) + o[r]);
        }
      }
    }
  });
  return y;
}
"""


def pack(codes: torch.Tensor, block_scales: torch.Tensor, block_mins: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """codes [N, K] in 0..15, per-32-channel scales and mins [N, K/32] -> the kernel's three tensors."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n // 4, 4, k // 64, 2, 32)
    packed = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).permute(0, 2, 1, 3).contiguous()
    scales = block_scales.float().reshape(n // 4, 4, k // 64, 2).permute(0, 2, 1, 3).contiguous()
    mins = block_mins.float().reshape(n // 4, 4, k // 32).permute(0, 2, 1).contiguous()
    return packed, scales, mins


def bench(fn, n: int = 100) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    mod = load_inline("lmport_w4a8_experiment", cpp_sources=[CPP_SOURCE], functions=["w4a8_gemm"],
                      extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
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
            ref = Int4Weight.from_codes(q.to(torch.int32), s, low, 32, torch.bfloat16)
            deq = (q.reshape(N, K // 32, 32) * s[..., None] + low[..., None]).reshape(N, K)
            P, S, O = pack(q, s, low)
            x = torch.randn(M, K, dtype=torch.bfloat16)
            exact = x.float() @ deq.T
            err = ((mod.w4a8_gemm(x, P, S, O).float() - exact).abs().max() / exact.abs().max()).item()
            err_torch = ((ref.matmul(x).float() - exact).abs().max() / exact.abs().max()).item()
            calls = 20 if N > 10000 else 300
            own, theirs = bench(lambda: mod.w4a8_gemm(x, P, S, O), calls), bench(lambda: ref.matmul(x), calls)
            weight = 30 if N < 10000 else 1  # a decode step: 30 layers of each projection, one lm_head
            totals[0] += own * weight
            totals[1] += theirs * weight
            print(f"M={M} N={N} K={K}: max rel. error own {err:.1e}, torch {err_torch:.1e}; own {own * 1e6:.1f} us, "
                  f"torch {theirs * 1e6:.1f} us, own/torch speed {theirs / own:.2f}x")
        print(f"M={M} a token's matmuls: own {totals[0] * 1e3:.2f} ms, torch {totals[1] * 1e3:.2f} ms, "
              f"{totals[1] / totals[0]:.2f}x")


if __name__ == "__main__":
    main()
