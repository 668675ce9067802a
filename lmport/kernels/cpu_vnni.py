"""C++ source of the CPU integer matmuls on AVX-512 VNNI (W4A8 and W8A8), compiled into the lmport.kernels.cpu
extension.

Why: torch's `_weight_int4pack_mm_for_cpu` and `_weight_int8pack_mm` widen every weight to floating point and
multiply in fp32, so at decode batch sizes they are compute-bound well below the memory bandwidth
(docs/performance.md). These kernels multiply the weights as integers: each activation row is quantized to int8 per
32 channels (scale = max |x| / 127, as llama.cpp quantizes activations for its Q4 / Q8 dot products), and one
`vpdpbusd` does 64 multiply-adds of unsigned weight codes by signed int8 activations. Per 32-channel block the
integer dot product is scaled in fp32 by the weight's and the activation's scales.

- int4 (`int4_matmul`): codes 0..15 with w = code * scale + offset per 32 channels. The offsets are applied through
  per-32 sums of the exact activations, so only the activations' rounding separates it from the W4A16 matmul.
- int8 (`int8_matmul`): signed codes q with w = q * scale, one scale per row (`quantization="int8"`, applied once
  at the end) or per row and 32 channels (a GGUF's Q8_0 blocks). They are stored as q + 128 (unsigned, as
  `vpdpbusd` wants them); each dot product starts from -128 * sum(activation codes), computed once per activation
  row and 64 channels, so the result is exactly sum(q * activation code): W8A8 as llama.cpp's Q8_0 x Q8_0 dot
  product.

The layouts (`pack_int4` / `pack_int8` in lmport.engine.quantization): weight rows in tiles of 4; per tile and 64
input channels, 4 rows of codes (int4: 32 bytes a row, byte j holding channel j in its low nibble and channel j + 32
in its high one, so one 32-byte load unpacks into 64 codes in channel order; int8: 64 bytes a row). Block scales per
tile, 64 channels and row: 2 fp16 values (the two 32-channel blocks), or int8's row scales: a float per row; int4's
offsets per tile, 32 channels: 4 fp16 values. fp16, as GGUF stores its block scales, because at batch 1 these
kernels are bound by the bytes they read: fp32 scales and offsets made int4's weights 20 % larger.

Built only where the compiler targets AVX-512 VNNI (-march=native); elsewhere `vnni_matmul_supported()` is false and
lmport keeps torch's kernels.
"""

from __future__ import annotations

VNNI_SOURCE = r"""
// ---- integer weights x int8-quantized activations (lmport.kernels.cpu_vnni)
#include <ATen/record_function.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__AVX512VNNI__)
#define LMPORT_VNNI 1
namespace {
constexpr int kVnniTile = 4;  // weight rows sharing each activation load
constexpr int kVnniRows = 4;  // activation rows sharing each load of the weights

template <int Bits>
inline __m512i load_codes(const uint8_t* p) {  // one row's 64 channels -> 64 unsigned codes in channel order
  if constexpr (Bits == 8) {
    return _mm512_loadu_si512(p);
  } else {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  }
}

inline __m512 block_pair(const float* p, __m512i index) {  // lanes 0-7: p[0], lanes 8-15: p[1]
  return _mm512_permutexvar_ps(index, _mm512_castps128_ps512(_mm_castsi128_ps(
      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
}

inline __m512 block_pair(const at::Half* p, __m512i index) {  // the same from two fp16 values
  int32_t raw;
  std::memcpy(&raw, p, sizeof(raw));
  return _mm512_permutexvar_ps(index, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(raw))));
}

inline __m128 four_halves(const at::Half* p) {
  return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

inline __m512 bf16_to_float(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// x bf16 [M, K] -> int8 codes [M, K], scales [M, K/32] and, unless sums is null, the exact sums [M, K/32] of each
// 32-channel block (only int4's offsets need them)
void quantize_activations(const at::BFloat16* x, int64_t M, int64_t K, int8_t* codes, float* scales, float* sums) {
  const int64_t blocks = K / 32;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b) {
      const __m512i raw = _mm512_loadu_si512(x + m * K + b * 32);
      const __m512 f0 = bf16_to_float(_mm512_castsi512_si256(raw));
      const __m512 f1 = bf16_to_float(_mm512_extracti64x4_epi64(raw, 1));
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(f0), _mm512_abs_ps(f1)));
      const __m512 inverse = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      int8_t* out = codes + m * K + b * 32;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                       _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(f0, inverse))));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16),
                       _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(f1, inverse))));
      scales[m * blocks + b] = amax / 127.0f;
      if (sums != nullptr) sums[m * blocks + b] = _mm512_reduce_add_ps(_mm512_add_ps(f0, f1));
    }
}

// y [M, N] = x @ w.T for Bits-wide codes in the layout above; offsets only for int4. RowScales: one scale per
// weight row (float [N]), applied once at the end, instead of one per row and 32 channels
template <int Bits, bool RowScales>
at::Tensor vnni_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& offsets) {
  constexpr int kRowBytes = Bits * 8;  // one row's 64 channels
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(), "x: contiguous bf16 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), tiles = packed.size(0), N = tiles * kVnniTile;
  const int64_t chunks = K / 64, blocks = K / 32;
  TORCH_CHECK(K % 64 == 0 && packed.dim() == 4 && packed.size(1) == chunks && packed.size(2) == kVnniTile &&
              packed.size(3) == kRowBytes && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed: contiguous uint8 [N/4, K/64, 4, ", kRowBytes, "] for x's K = ", K);
  if constexpr (RowScales) {
    TORCH_CHECK(scales.sizes() == at::IntArrayRef({N}) && scales.scalar_type() == at::kFloat &&
                scales.is_contiguous(), "scales: float [N] (one per row) or float16 [N/4, K/64, 4, 2]");
  } else {
    TORCH_CHECK(scales.sizes() == at::IntArrayRef({tiles, chunks, kVnniTile, 2}) &&
                scales.scalar_type() == at::kHalf && scales.is_contiguous(), "scales: float16 [N/4, K/64, 4, 2]");
  }
  if constexpr (Bits == 4) {
    TORCH_CHECK(offsets.sizes() == at::IntArrayRef({tiles, blocks, kVnniTile}) &&
                offsets.scalar_type() == at::kHalf && offsets.is_contiguous(), "offsets: float16 [N/4, K/32, 4]");
  }
  std::vector<int8_t> x_codes(M * K);
  std::vector<float> x_scales(M * blocks), x_sums(Bits == 4 ? M * blocks : 0);
  quantize_activations(x.data_ptr<at::BFloat16>(), M, K, x_codes.data(), x_scales.data(),
                       Bits == 4 ? x_sums.data() : nullptr);
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* P = packed.data_ptr<uint8_t>();
  const float* row_scales = RowScales ? scales.data_ptr<float>() : nullptr;
  const at::Half* S = RowScales ? nullptr : scales.data_ptr<at::Half>();
  const at::Half* O = Bits == 4 ? offsets.data_ptr<at::Half>() : nullptr;
  at::BFloat16* Y = y.data_ptr<at::BFloat16>();
  const int64_t threads = at::get_num_threads();
  // Equal shares of the weight tiles: each thread streams its rows once, for every activation row.
  at::parallel_for(0, tiles, (tiles + threads - 1) / threads, [&](int64_t t0, int64_t t1) {
    const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i code_bias = _mm512_set1_epi8(static_cast<char>(0x80));  // int8 codes are stored as q + 128
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* tile_codes = P + t * chunks * kVnniTile * kRowBytes;
      const at::Half* tile_scales = RowScales ? nullptr : S + t * chunks * kVnniTile * 2;
      for (int64_t m0 = 0; m0 < M; m0 += kVnniRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kVnniRows, M - m0));
        __m512 acc[kVnniRows][kVnniTile];
        for (int i = 0; i < kVnniRows; ++i)
          for (int r = 0; r < kVnniTile; ++r) acc[i][r] = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c) {
          __m512i w[kVnniTile];
          __m512 w_scale[kVnniTile];
          for (int r = 0; r < kVnniTile; ++r) {
            w[r] = load_codes<Bits>(tile_codes + (c * kVnniTile + r) * kRowBytes);
            if constexpr (!RowScales) w_scale[r] = block_pair(tile_scales + (c * kVnniTile + r) * 2, halves);
          }
          for (int i = 0; i < rows; ++i) {
            const int64_t m = m0 + i;
            const __m512i xq = _mm512_loadu_si512(x_codes.data() + m * K + c * 64);
            const __m512 x_scale = block_pair(x_scales.data() + m * blocks + 2 * c, halves);
            __m512i start = _mm512_setzero_si512();  // int8: -128 * the activation codes, per lane of 4
            if constexpr (Bits == 8)
              start = _mm512_sub_epi32(start, _mm512_dpbusd_epi32(_mm512_setzero_si512(), code_bias, xq));
            for (int r = 0; r < kVnniTile; ++r) {
              const __m512i dot = _mm512_dpbusd_epi32(start, w[r], xq);
              const __m512 scale = RowScales ? x_scale : _mm512_mul_ps(w_scale[r], x_scale);
              acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[i][r]);
            }
          }
        }
        for (int i = 0; i < rows; ++i) {
          const int64_t m = m0 + i;
          alignas(16) float offsets_out[kVnniTile] = {0.0f, 0.0f, 0.0f, 0.0f};
          if constexpr (Bits == 4) {
            const at::Half* tile_offsets = O + t * blocks * kVnniTile;
            __m128 offset = _mm_setzero_ps();
            for (int64_t b = 0; b < blocks; ++b)
              offset = _mm_fmadd_ps(four_halves(tile_offsets + b * kVnniTile), _mm_set1_ps(x_sums[m * blocks + b]),
                                    offset);
            _mm_store_ps(offsets_out, offset);
          }
          for (int r = 0; r < kVnniTile; ++r) {
            const float sum = _mm512_reduce_add_ps(acc[i][r]);
            Y[m * N + t * kVnniTile + r] =
                at::BFloat16(RowScales ? sum * row_scales[t * kVnniTile + r] : sum + offsets_out[r]);
          }
        }
      }
    }
  });
  return y;
}
}  // namespace
#endif

bool vnni_matmul_supported() {
#ifdef LMPORT_VNNI
  return true;
#else
  return false;
#endif
}

// x bf16 [M, K] (contiguous); packed uint8 [N/4, K/64, 4, 32]; scales float16 [N/4, K/64, 4, 2]; offsets float16
// [N/4, K/32, 4]: y = x @ (code * scale + offset).T in bf16 [M, N], with x rounded to int8 per 32 channels
at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& offsets) {
#ifdef LMPORT_VNNI
  RECORD_FUNCTION("lmport::int4_matmul", std::vector<c10::IValue>());  // a matmul to lmport bench profile
  return vnni_matmul<4, false>(x, packed, scales, offsets);
#else
  TORCH_CHECK(false, "int4_matmul needs AVX-512 VNNI (see vnni_matmul_supported)");
#endif
}

// x bf16 [M, K] (contiguous); packed uint8 [N/4, K/64, 4, 64] holding q + 128; scales float [N] (per row) or
// float16 [N/4, K/64, 4, 2] (per row and 32 channels): y = x @ (q * scale).T in bf16 [M, N], x rounded to int8
// per 32 channels
at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
#ifdef LMPORT_VNNI
  RECORD_FUNCTION("lmport::int8_matmul", std::vector<c10::IValue>());
  if (scales.dim() == 1) return vnni_matmul<8, true>(x, packed, scales, at::Tensor());
  return vnni_matmul<8, false>(x, packed, scales, at::Tensor());
#else
  TORCH_CHECK(false, "int8_matmul needs AVX-512 VNNI (see vnni_matmul_supported)");
#endif
}
"""
