"""C++ kernels for CPU tensors, built at run time with load_inline: gather-free paged decode and prefill attention
(the prefill kernel's source is in cpu_prefill.py) and fused RMSNorm (with the residual add), SiLU-and-mul and
rotary embedding.

Decode attention: the reference (`lmport.kernels.reference.paged_attention_decode`) copies every sequence's K/V blocks into
a contiguous tensor and runs SDPA on it; this kernel reads K/V straight from the paged cache through the block table
instead. Work is split over (sequence, kv_head) pairs with `at::parallel_for` (so `torch.set_num_threads` is
honoured); each pair handles all the query heads of its GQA group together, so each K/V row is loaded (and converted
to fp32) once. Softmax is two-pass (scores, then max / exp / sum, then the weighted sum of V), all in fp32, with loops
written so that gcc -O3 -march=native vectorizes them (`omp simd` reductions for the dot products, a branch-free
polynomial exp).

Elementwise kernels (`rms_norm`, `silu_and_mul`, `rotary_embedding`): one pass per token row (`at::parallel_for` over
rows) instead of the reference's 5-10 PyTorch ops, each allocating a temporary. The math is fp32 and the result is
rounded to the model dtype at exactly the points where the reference's ops round (each PyTorch op on bf16/fp16 tensors
computes in fp32 and rounds its output), with FMA contraction off: fp32 matches the reference up to summation order
(and exp's last bit), bf16/fp16 within one ulp.

The extension is compiled on first use (once per machine and torch install: a build directory keyed by a hash of the
source, the flags, torch and the CPU) under an flock, which the kernel drops when its holder dies. If the build fails
(no compiler, no ninja, unwritable cache), one warning goes to the `lmport` logger and every function here falls back
to the reference for the rest of the process.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

import torch

from lmport.kernels import reference
from lmport.kernels.cpu_decoder import DECODER_BINDINGS, DECODER_SOURCE
from lmport.kernels.cpu_prefill import PREFILL_SOURCE
from lmport.kernels.cpu_vnni import VNNI_SOURCE

logger = logging.getLogger("lmport")

CFLAGS = ("-O3", "-march=native", "-fopenmp")
LDFLAGS = ("-fopenmp",)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FUNCTIONS = ["paged_attention_decode", "paged_attention_prefill", "rms_norm", "silu_and_mul", "rotary_embedding",
             "int4_matmul", "int8_matmul", "vnni_matmul_supported"]

CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <array>
#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>
#include <immintrin.h>

namespace {

// K/V row -> fp32. bf16 is the high half of an fp32: shift, then reinterpret (vectorizes).
inline void to_float(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}
inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}
inline void to_float(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// fp8 cache rows: a 256-entry table per format (exact, and cheaper than decoding the bits per element).
template <typename fp8_t>
const float* fp8_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = static_cast<float>(fp8_t(static_cast<uint8_t>(i), fp8_t::from_bits()));
    return t;
  }();
  return table.data();
}
template <typename fp8_t>
inline void fp8_to_float(const fp8_t* src, float* dst, int64_t n) {
  const uint8_t* s = reinterpret_cast<const uint8_t*>(src);
  const float* table = fp8_table<fp8_t>();
  for (int64_t i = 0; i < n; ++i) dst[i] = table[s[i]];
}
inline void to_float(const c10::Float8_e4m3fn* src, float* dst, int64_t n) { fp8_to_float(src, dst, n); }
inline void to_float(const c10::Float8_e5m2* src, float* dst, int64_t n) { fp8_to_float(src, dst, n); }

inline void from_float(float x, float* dst) { *dst = x; }
inline void from_float(float x, c10::BFloat16* dst) { *dst = c10::BFloat16(x); }
inline void from_float(float x, c10::Half* dst) { *dst = c10::Half(x); }

// exp for x <= 0 (Cephes expf: round-to-nearest range reduction, degree-6 polynomial; ~1 ulp). Branch-free so the
// loop over a row of scores vectorizes; inputs below -87 give 0 (as expf underflows to denormals / 0).
inline float exp_nonpos(float x) {
  const float lo = -87.0f;
  const bool under = x < lo;
  x = x < lo ? lo : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer (round-to-nearest mode)
  float n = x * 1.44269504088896341f + magic;
  n = n - magic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return under ? 0.0f : p * scale;
}

// Software prefetch of one block's rows for this kv head (blocks are scattered, so hardware prefetch can't follow).
// Into L2 (prefetcht2), not L1: with the cache cold, as in a decode step, L1 prefetches made a batch-32 call 1.5x
// slower here (`python -m lmport.kernels.cpu --cold`: 0.65 vs 0.43 ms a layer).
template <typename scalar_t>
inline void prefetch_block(const scalar_t* base, int64_t c_s1, int64_t n, int64_t D) {
  const int64_t bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t t = 0; t < n; ++t) {
    const char* r = reinterpret_cast<const char*>(base + t * c_s1);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(r + b, 0, 1);
  }
}

// Rows t..t+3 of a converted [n, D] tile dotted with one query: four independent accumulators.
template <int DC>
inline void dot4(const float* qg, const float* tile, int64_t D, float* out) {
  const float* r0 = tile;
  const float* r1 = tile + D;
  const float* r2 = tile + 2 * D;
  const float* r3 = tile + 3 * D;
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t d = 0; d < (DC > 0 ? DC : D); ++d) {
    const float x = qg[d];
    s0 += x * r0[d];
    s1 += x * r1[d];
    s2 += x * r2[d];
    s3 += x * r3[d];
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

template <int DC>
inline float dot1(const float* qg, const float* r, int64_t D) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < (DC > 0 ? DC : D); ++d) s += qg[d] * r[d];
  return s;
}

// One (sequence, kv_head) pair: the G query heads of the group against the sequence's L keys.
// DC > 0: head_dim known at compile time (unrolled, vectorized); DC == 0: runtime head_dim.
template <typename scalar_t, typename cache_t, int DC>
void attend_group(const scalar_t* q, int64_t q_s1,                 // q row of head 0 of the group; stride per head
                  const cache_t* k, const cache_t* v,               // cache base + kv_head offset
                  int64_t c_s0, int64_t c_s1,                       // cache strides: block, slot
                  const int32_t* table, int64_t L, int64_t block_size, int64_t G, int64_t D_rt, float scale,
                  int64_t window, float soft_cap,                   // window 0 / soft_cap 0: off
                  scalar_t* out, int64_t o_s1,
                  std::vector<float>& qf, std::vector<float>& scores, std::vector<float>& acc,
                  std::vector<float>& tile_buf, std::vector<float>& inv_sum) {
  const int64_t D = DC > 0 ? DC : D_rt;
  qf.resize(G * D);
  scores.resize(G * L);  // row g: the scores, then the softmax numerators, of keys 0..L-1
  acc.assign(G * D, 0.0f);
  tile_buf.resize(block_size * D);
  inv_sum.resize(G);
  for (int64_t g = 0; g < G; ++g) {
    to_float(q + g * q_s1, qf.data() + g * D, D);
    for (int64_t d = 0; d < D; ++d) qf[g * D + d] *= scale;
  }
  float* sc = scores.data();
  float* tile = tile_buf.data();
  const float* qp = qf.data();
  const int64_t num_blocks = (L + block_size - 1) / block_size;
  // A sliding window hides keys before L - window: whole blocks before it are skipped (never read, so they may
  // already be freed), and the rest of the first block is masked. Scores stay indexed by absolute position.
  const int64_t first_key = window > 0 && L > window ? L - window : 0;
  const int64_t j0 = first_key / block_size, lo = j0 * block_size;

  // pass 1: scores, one block (<= block_size keys, converted to fp32 once) at a time
  for (int64_t j = j0; j < num_blocks; ++j) {
    const cache_t* kb = k + static_cast<int64_t>(table[j]) * c_s0;
    const int64_t n = std::min(block_size, L - j * block_size);
    if (j + 1 < num_blocks)
      prefetch_block(k + static_cast<int64_t>(table[j + 1]) * c_s0, c_s1,
                     std::min(block_size, L - (j + 1) * block_size), D);
    else
      prefetch_block(v + static_cast<int64_t>(table[j0]) * c_s0, c_s1, std::min(block_size, L - lo), D);
    for (int64_t t = 0; t < n; ++t) to_float(kb + t * c_s1, tile + t * D, D);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qp + g * D;
      float* sg = sc + g * L + j * block_size;
      int64_t t = 0;
      for (; t + 4 <= n; t += 4) dot4<DC>(qg, tile + t * D, D, sg + t);
      for (; t < n; ++t) sg[t] = dot1<DC>(qg, tile + t * D, D);
    }
  }
  if (soft_cap > 0.0f) {  // Gemma 2: scores = cap * tanh(score / cap), before the mask
    const float inv_cap = 1.0f / soft_cap;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = lo; i < L; ++i) sc[g * L + i] = soft_cap * std::tanh(sc[g * L + i] * inv_cap);
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = lo; i < first_key; ++i) sc[g * L + i] = -std::numeric_limits<float>::infinity();

  // softmax numerators and denominators
  for (int64_t g = 0; g < G; ++g) {
    float* sg = sc + g * L + lo;
    const int64_t n_keys = L - lo;
    // max in 16 lanes (vectorizes as vmaxps), then across the lanes
    float lanes[16];
    for (int l = 0; l < 16; ++l) lanes[l] = -std::numeric_limits<float>::infinity();
    int64_t i = 0;
    for (; i + 16 <= n_keys; i += 16)
      for (int l = 0; l < 16; ++l) lanes[l] = sg[i + l] > lanes[l] ? sg[i + l] : lanes[l];
    for (; i < n_keys; ++i) lanes[0] = sg[i] > lanes[0] ? sg[i] : lanes[0];
    float m = lanes[0];
    for (int l = 1; l < 16; ++l) m = lanes[l] > m ? lanes[l] : m;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n_keys; ++i) {
      const float e = exp_nonpos(sg[i] - m);
      sg[i] = e;
      sum += e;
    }
    inv_sum[g] = 1.0f / sum;
  }

  // pass 2: weighted sum of V, four rows per accumulator update
  float* ac = acc.data();
  for (int64_t j = j0; j < num_blocks; ++j) {
    const cache_t* vb = v + static_cast<int64_t>(table[j]) * c_s0;
    const int64_t n = std::min(block_size, L - j * block_size);
    if (j + 1 < num_blocks)
      prefetch_block(v + static_cast<int64_t>(table[j + 1]) * c_s0, c_s1,
                     std::min(block_size, L - (j + 1) * block_size), D);
    for (int64_t t = 0; t < n; ++t) to_float(vb + t * c_s1, tile + t * D, D);
    for (int64_t g = 0; g < G; ++g) {
      const float* pg = sc + g * L + j * block_size;
      float* ag = ac + g * D;
      int64_t t = 0;
      for (; t + 4 <= n; t += 4) {
        const float p0 = pg[t], p1 = pg[t + 1], p2 = pg[t + 2], p3 = pg[t + 3];
        const float* r0 = tile + t * D;
        const float* r1 = r0 + D;
        const float* r2 = r1 + D;
        const float* r3 = r2 + D;
#pragma omp simd
        for (int64_t d = 0; d < (DC > 0 ? DC : D); ++d) ag[d] += p0 * r0[d] + p1 * r1[d] + p2 * r2[d] + p3 * r3[d];
      }
      for (; t < n; ++t) {
        const float p = pg[t];
        const float* r = tile + t * D;
#pragma omp simd
        for (int64_t d = 0; d < (DC > 0 ? DC : D); ++d) ag[d] += p * r[d];
      }
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) from_float(ac[g * D + d] * inv_sum[g], out + g * o_s1 + d);
}

template <typename scalar_t, typename cache_t, int DC>
void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables,
         const at::Tensor& seq_lens, double scale, int64_t window, double soft_cap, at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t block_size = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t G = Hq / Hkv;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const cache_t* kp = static_cast<const cache_t*>(k_cache.data_ptr());
  const cache_t* vp = static_cast<const cache_t*>(v_cache.data_ptr());
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t q_s0 = q.stride(0), q_s1 = q.stride(1);
  const int64_t k_s0 = k_cache.stride(0), k_s1 = k_cache.stride(1), k_s2 = k_cache.stride(2);
  const int64_t v_s0 = v_cache.stride(0), v_s1 = v_cache.stride(1), v_s2 = v_cache.stride(2);
  const int64_t bt_s0 = block_tables.stride(0);
  const int64_t o_s0 = out.stride(0), o_s1 = out.stride(1);
  TORCH_CHECK(k_s0 == v_s0 && k_s1 == v_s1 && k_s2 == v_s2, "k_cache and v_cache must have the same strides");
  const float fscale = static_cast<float>(scale);
  const int64_t capacity = block_tables.size(1) * block_size;
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lens[b] <= capacity, "seq_lens[", b, "] = ", lens[b], " exceeds the block table (", capacity, ")");

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, scores, acc, tile, inv_sum;  // scratch, reused by every item of this chunk
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv;
      const int64_t L = lens[b];
      scalar_t* o = op + b * o_s0 + h * G * o_s1;
      if (L <= 0) {  // padded row: defined output (zeros), nothing read
        for (int64_t g = 0; g < G; ++g)
          for (int64_t d = 0; d < D; ++d) o[g * o_s1 + d] = scalar_t(0);
        continue;
      }
      attend_group<scalar_t, cache_t, DC>(qp + b * q_s0 + h * G * q_s1, q_s1, kp + h * k_s2, vp + h * k_s2, k_s0, k_s1,
                                 bt + b * bt_s0, L, block_size, G, D, fscale, window, static_cast<float>(soft_cap),
                                 o, o_s1, qf, scores, acc, tile,
                                 inv_sum);
    }
  });
}

template <typename scalar_t, typename cache_t>
void dispatch_dim(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bt,
                  const at::Tensor& lens, double scale, int64_t window, double cap, at::Tensor& out) {
  switch (q.size(2)) {
    case 32: return run<scalar_t, cache_t, 32>(q, k, v, bt, lens, scale, window, cap, out);
    case 64: return run<scalar_t, cache_t, 64>(q, k, v, bt, lens, scale, window, cap, out);
    case 128: return run<scalar_t, cache_t, 128>(q, k, v, bt, lens, scale, window, cap, out);
    default: return run<scalar_t, cache_t, 0>(q, k, v, bt, lens, scale, window, cap, out);
  }
}

// The cache holds the model dtype, or one of the fp8 formats (dequantized as rows are loaded; scales applied by
// the caller).
template <typename scalar_t>
void dispatch_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bt,
                    const at::Tensor& lens, double scale, int64_t window, double cap, at::Tensor& out) {
  switch (k.scalar_type()) {
    case at::kFloat8_e4m3fn: return dispatch_dim<scalar_t, c10::Float8_e4m3fn>(q, k, v, bt, lens, scale, window, cap, out);
    case at::kFloat8_e5m2: return dispatch_dim<scalar_t, c10::Float8_e5m2>(q, k, v, bt, lens, scale, window, cap, out);
    default:
      TORCH_CHECK(k.scalar_type() == q.scalar_type(), "the cache holds q's dtype or fp8, not ", k.scalar_type());
      return dispatch_dim<scalar_t, scalar_t>(q, k, v, bt, lens, scale, window, cap, out);
  }
}

}  // namespace

at::Tensor paged_attention_decode(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
                                  at::Tensor seq_lens, double scale, int64_t window, double soft_cap) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "q [B,Hq,D], caches [N,bs,Hkv,D]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache shapes differ");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k_cache and v_cache must share a dtype");
  TORCH_CHECK(q.size(2) == k_cache.size(3), "head_dim mismatch");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "last dim must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt, "int32 tables");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.stride(1) == 1 && seq_lens.is_contiguous(), "table layout");
  TORCH_CHECK(block_tables.size(0) == q.size(0) && seq_lens.size(0) == q.size(0), "batch mismatch");
  at::Tensor out = at::empty(q.sizes(), q.options());
  switch (q.scalar_type()) {
    case at::kFloat: dispatch_cache<float>(q, k_cache, v_cache, block_tables, seq_lens, scale, window, soft_cap, out);
      break;
    case at::kBFloat16:
      dispatch_cache<c10::BFloat16>(q, k_cache, v_cache, block_tables, seq_lens, scale, window, soft_cap, out);
      break;
    case at::kHalf:
      dispatch_cache<c10::Half>(q, k_cache, v_cache, block_tables, seq_lens, scale, window, soft_cap, out);
      break;
    default: TORCH_CHECK(false, "unsupported dtype ", q.scalar_type());
  }
  return out;
}
// ---- elementwise kernels: one row per work item, fp32 math, rounded to the dtype exactly where the reference
// rounds (each PyTorch op on bf16/fp16 tensors computes in fp32 and rounds its result). No FMA contraction here, so
// fp32 results match the reference's separate multiply / add ops bit for bit.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

namespace {

// Loads, stores and roundings are defined inside this region (functions compiled with other options are not
// inlined here, which would stop the row loops from vectorizing): bf16 by bit manipulation, exactly as c10::BFloat16
// rounds (to nearest even, NaN -> 0x7FC0); fp16 through c10::Half (not vectorized: not the hot path).
inline float ld(const float* p) { return *p; }
inline float ld(const c10::Half* p) { return static_cast<float>(*p); }
inline float ld(const c10::BFloat16* p) {
  uint32_t bits = static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(p)) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(r);
}
inline void st(float* p, float x) { *p = x; }
inline void st(c10::Half* p, float x) { *p = c10::Half(x); }
inline void st(c10::BFloat16* p, float x) { *reinterpret_cast<uint16_t*>(p) = bf16_bits(x); }
// round an fp32 value to the dtype and back (identity for float)
template <typename scalar_t>
inline float rnd(float x) { return x; }
template <>
inline float rnd<c10::Half>(float x) { return static_cast<float>(c10::Half(x)); }
template <>
inline float rnd<c10::BFloat16>(float x) {
  const uint32_t bits = static_cast<uint32_t>(bf16_bits(x)) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// expf (Cephes: round-to-nearest range reduction, degree-6 polynomial; ~1 ulp), branch-free so that loops
// vectorize. Inputs are clamped to [-87.3, 88.7]: below gives 0, above a large finite value (silu only divides by it).
inline float exp_clamped(float x) {  // explicit fmas: contraction is off in this region
  const bool under = x < -87.3f;
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer (round-to-nearest mode)
  float n = __builtin_fmaf(x, 1.44269504088896341f, magic);
  n = n - magic;
  float r = __builtin_fmaf(n, -0.693359375f, x);
  r = __builtin_fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = __builtin_fmaf(p, r, 1.3981999507e-3f);
  p = __builtin_fmaf(p, r, 8.3334519073e-3f);
  p = __builtin_fmaf(p, r, 4.1665795894e-2f);
  p = __builtin_fmaf(p, r, 1.6666665459e-1f);
  p = __builtin_fmaf(p, r, 5.0000001201e-1f);
  p = __builtin_fmaf(p * r, r, r) + 1.0f;
  // 2^n as two factors: n reaches 128 at the top of the range, which one float exponent can't hold
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t e1 = (ni / 2 + 127) << 23, e2 = (ni - ni / 2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &e1, sizeof(s1));
  std::memcpy(&s2, &e2, sizeof(s2));
  return under ? 0.0f : p * s1 * s2;
}

template <typename scalar_t>
void rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor* residual,
                   at::Tensor& out, at::Tensor* res_out) {
  const int64_t N = x.size(0), H = x.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  const scalar_t* rp = residual ? residual->data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  scalar_t* rop = res_out ? res_out->data_ptr<scalar_t>() : nullptr;
  const int64_t xs = x.stride(0), rs = residual ? residual->stride(0) : 0;
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(H);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* xr = xp + n * xs;
      float* b = buf.data();
      if (rp) {
        const scalar_t* rr = rp + n * rs;
        scalar_t* ro = rop + n * H;
#pragma omp simd
        for (int64_t i = 0; i < H; ++i) {
          const float r = rnd<scalar_t>(ld(xr + i) + ld(rr + i));  // x + residual, in the dtype
          st(ro + i, r);
          b[i] = r;
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < H; ++i) b[i] = ld(xr + i);
      }
      float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < H; ++i) ss += b[i] * b[i];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + feps);
      scalar_t* o = op + n * H;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) st(o + i, rnd<scalar_t>(b[i] * inv) * ld(wp + i));
    }
  });
}

template <typename scalar_t>
void silu_and_mul_rows(const at::Tensor& x, at::Tensor& out) {
  const int64_t N = x.size(0), I = out.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t xs = x.stride(0);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* g = xp + n * xs;
      const scalar_t* u = g + I;
      scalar_t* o = op + n * I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) {
        const float a = ld(g + i);
        const float s = rnd<scalar_t>(a / (1.0f + exp_clamped(-a)));
        st(o + i, s * ld(u + i));
      }
    }
  });
}

template <typename scalar_t>
void rope_rows(const int64_t* pos, const scalar_t* x, int64_t xs, int64_t heads, const float* cache, int64_t cs,
               int64_t D, int64_t N, scalar_t* out) {
  const int64_t half = D / 2;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> cs_buf(D);
    for (int64_t n = begin; n < end; ++n) {
      const float* row = cache + pos[n] * cs;
      float* c = cs_buf.data();
      for (int64_t i = 0; i < D; ++i) c[i] = rnd<scalar_t>(row[i]);  // cos | sin, cast to the dtype
      const float* sn = c + half;
      for (int64_t h = 0; h < heads; ++h) {
        const scalar_t* xr = x + n * xs + h * D;
        scalar_t* o = out + (n * heads + h) * D;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = ld(xr + i), x2 = ld(xr + half + i);
          st(o + i, rnd<scalar_t>(x1 * c[i]) - rnd<scalar_t>(x2 * sn[i]));
          st(o + half + i, rnd<scalar_t>(x2 * c[i]) + rnd<scalar_t>(x1 * sn[i]));
        }
      }
    }
  });
}

#define LMPORT_DISPATCH(dtype, fn, ...)                                          \
  switch (dtype) {                                                               \
    case at::kFloat: fn<float>(__VA_ARGS__); break;                              \
    case at::kBFloat16: fn<c10::BFloat16>(__VA_ARGS__); break;                   \
    case at::kHalf: fn<c10::Half>(__VA_ARGS__); break;                           \
    default: TORCH_CHECK(false, "unsupported dtype ", dtype);                    \
  }

}  // namespace

std::vector<at::Tensor> rms_norm(at::Tensor x, at::Tensor weight, double eps, c10::optional<at::Tensor> residual) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1, "x: CPU [N, H], contiguous rows");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1), "weight [H]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight must have x's dtype");
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.sizes() == x.sizes() && r.stride(1) == 1 && r.scalar_type() == x.scalar_type(), "residual");
    at::Tensor r_out = at::empty(x.sizes(), x.options());
    LMPORT_DISPATCH(x.scalar_type(), rms_norm_rows, x, weight, eps, &r, out, &r_out);
    return {out, r_out};
  }
  LMPORT_DISPATCH(x.scalar_type(), rms_norm_rows, x, weight, eps, nullptr, out, nullptr);
  return {out};
}

at::Tensor silu_and_mul(at::Tensor x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0,
              "x: CPU [N, 2I], contiguous rows");
  at::Tensor out = at::empty({x.size(0), x.size(1) / 2}, x.options());
  LMPORT_DISPATCH(x.scalar_type(), silu_and_mul_rows, x, out);
  return out;
}

std::vector<at::Tensor> rotary_embedding(at::Tensor positions, at::Tensor q, at::Tensor k, at::Tensor cos_sin_cache,
                                         int64_t head_dim) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.stride(1) == 1 && k.stride(1) == 1, "q, k: [N, H*D] rows");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "q and k must share a dtype");
  TORCH_CHECK(head_dim % 2 == 0 && q.size(1) % head_dim == 0 && k.size(1) % head_dim == 0, "head_dim");
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat && cos_sin_cache.dim() == 2 &&
              cos_sin_cache.stride(1) == 1 && cos_sin_cache.size(1) == head_dim, "cos_sin_cache: float32 [P, D]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(), "int64 positions");
  const int64_t N = q.size(0);
  TORCH_CHECK(positions.numel() == N && k.size(0) == N, "row count mismatch");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(pos[n] >= 0 && pos[n] < cos_sin_cache.size(0), "position ", pos[n], " out of the rotary cache");
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  const float* cache = cos_sin_cache.data_ptr<float>();
  const int64_t cs = cos_sin_cache.stride(0);
  switch (q.scalar_type()) {
#define LMPORT_ROPE(T)                                                                                           \
  rope_rows<T>(pos, q.data_ptr<T>(), q.stride(0), q.size(1) / head_dim, cache, cs, head_dim, N, q_out.data_ptr<T>()); \
  rope_rows<T>(pos, k.data_ptr<T>(), k.stride(0), k.size(1) / head_dim, cache, cs, head_dim, N, k_out.data_ptr<T>()); \
  break;
    case at::kFloat: LMPORT_ROPE(float)
    case at::kBFloat16: LMPORT_ROPE(c10::BFloat16)
    case at::kHalf: LMPORT_ROPE(c10::Half)
#undef LMPORT_ROPE
    default: TORCH_CHECK(false, "unsupported dtype ", q.scalar_type());
  }
  return {q_out, k_out};
}

#pragma GCC pop_options
""" + PREFILL_SOURCE + VNNI_SOURCE + DECODER_SOURCE + "\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n" + "".join(
    f'  m.def("{name}", &{name});\n' for name in FUNCTIONS) + DECODER_BINDINGS + "}\n"

_lock = threading.Lock()
_module: ModuleType | None = None
_failed = False


def _build_name() -> str:
    """Extension name keyed by source, flags, torch (version and install: another venv's headers and libtorch
    rebuild the module) and CPU, so -march=native code never runs on another CPU."""
    cpu = [platform.machine()]
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        for field in ("model name", "flags"):  # the first processor's: all cores of a machine are alike
            cpu += [line.split(":", 1)[-1].strip() for line in lines if line.startswith(field)][:1]
    except OSError:
        pass
    key = "\0".join([CPP_SOURCE, " ".join(FUNCTIONS), " ".join(CFLAGS + LDFLAGS), torch.__version__,
                     os.path.dirname(torch.__file__), *cpu])
    return "lmport_cpu_kernels_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def build_directory() -> Path:
    """Where the extension is built: under $TORCH_EXTENSIONS_DIR if set, else lmport's own cache directory."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lmport", "kernels")
    return Path(root) / _build_name()


def _compile(directory: Path) -> ModuleType:
    """load_inline under an flock on the build directory.

    torch guards every load (even one with nothing to build: ninja still runs) with a lock *file* that only its
    holder removes, so a process killed in that window (a worker SIGKILLed as it starts) leaves every later load
    waiting forever. An flock is released by the kernel when its holder dies; holding it, no other lmport process is
    inside load_inline here, so a leftover torch lock file is stale and is removed.
    """
    from torch.utils.cpp_extension import load_inline
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "lmport-build.lock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (directory / "lock").unlink(missing_ok=True)
        if not (directory / f"{directory.name}.so").exists():
            logger.info("compiling lmport's CPU C++ kernels into %s (once per machine, about a minute)", directory)
        # Lists copied: load_inline appends its own flags to the ones it is given.
        return load_inline(name=directory.name, cpp_sources=[CPP_SOURCE], extra_cflags=list(CFLAGS),
                           extra_ldflags=list(LDFLAGS), build_directory=str(directory), verbose=False)


def load() -> ModuleType | None:
    """The compiled extension, building it on first call; None if the build failed (warned once)."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    with _lock:
        if _module is None and not _failed:
            try:
                _module = _compile(build_directory())
            except Exception as exc:  # no compiler, no ninja, unwritable cache dir, ...
                _failed = True
                logger.warning("CPU C++ kernels could not be built (%s: %s); using the slower PyTorch "
                               "reference for the rest of this process", type(exc).__name__,
                               str(exc).strip().splitlines()[-1] if str(exc).strip() else "")
    return _module


def available() -> bool:
    """Whether the compiled kernels are in use (builds them if needed)."""
    return load() is not None


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Same contract as lmport.kernels.reference.paged_attention_decode; falls back to it where the kernel can't run.
    The cache may hold q's dtype or an fp8 format (`k_scale` folds into the score scale, `v_scale` into the output)."""
    supported = (q.device.type == "cpu" and q.dim() == 3 and k_cache.dim() == 4 and q.dtype in DTYPES
                 and k_cache.dtype in (q.dtype, *reference.FP8_DTYPES) and v_cache.dtype == k_cache.dtype
                 and k_cache.stride() == v_cache.stride()
                 and k_cache.stride(3) == 1 and q.shape[1] % k_cache.shape[2] == 0)
    module = load() if supported else None
    if module is None:
        return reference.paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                                sliding_window, soft_cap, k_scale, v_scale)
    if q.stride(2) != 1:
        q = q.contiguous()
    if block_tables.dtype != torch.int32 or block_tables.stride(1) != 1:
        block_tables = block_tables.to(torch.int32).contiguous()
    if seq_lens.dtype != torch.int32 or not seq_lens.is_contiguous():
        seq_lens = seq_lens.to(torch.int32).contiguous()
    out = module.paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, float(scale * k_scale),
                                        sliding_window or 0, float(soft_cap or 0.0))
    return out if v_scale == 1.0 else out.mul_(v_scale)


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                            max_query_len: int, scale: float, sliding_window: int | None = None,
                            soft_cap: float | None = None, k_scale: float = 1.0,
                            v_scale: float = 1.0) -> torch.Tensor:
    """Same contract as lmport.kernels.reference.paged_attention_prefill; falls back to it where the kernel can't run
    (an fp8 cache: the reference dequantizes it)."""
    supported = (q.device.type == "cpu" and q.dim() == 3 and k_cache.dim() == 4 and q.dtype in DTYPES
                 and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype and k_cache.stride() == v_cache.stride()
                 and k_cache.stride(3) == 1 and q.shape[1] % k_cache.shape[2] == 0)
    module = load() if supported else None
    if module is None:
        return reference.paged_attention_prefill(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables,
                                                 max_query_len, scale, sliding_window, soft_cap, k_scale, v_scale)
    if q.stride(2) != 1:
        q = q.contiguous()
    tables = [t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()
              for t in (cu_seqlens_q, seq_lens, block_tables)]
    return module.paged_attention_prefill(q, k_cache, v_cache, *tables, float(scale), sliding_window or 0,
                                          float(soft_cap or 0.0))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as lmport.kernels.reference.rms_norm (fresh output tensors); falls back to it where it can't run."""
    supported = (x.device.type == "cpu" and x.dim() == 2 and x.dtype in DTYPES and weight.dtype == x.dtype
                 and weight.dim() == 1 and weight.shape[0] == x.shape[1]
                 and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape)))
    module = load() if supported else None
    if module is None:
        return reference.rms_norm(x, weight, eps, residual)
    if x.stride(1) != 1:
        x = x.contiguous()
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    outs = module.rms_norm(x, weight.contiguous(), float(eps), residual)
    return outs[0] if residual is None else (outs[0], outs[1])


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Same contract as lmport.kernels.reference.silu_and_mul; falls back to it where it can't run."""
    supported = x.device.type == "cpu" and x.dim() == 2 and x.dtype in DTYPES and x.shape[1] % 2 == 0
    module = load() if supported else None
    if module is None:
        return reference.silu_and_mul(x)
    return module.silu_and_mul(x if x.stride(1) == 1 else x.contiguous())


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as lmport.kernels.reference.rotary_embedding (new tensors; q/k may be strided row views, e.g. splits
    of a fused qkv projection); falls back to it where it can't run."""
    supported = (q.device.type == "cpu" and q.dim() == 2 and k.dim() == 2 and q.dtype in DTYPES
                 and k.dtype == q.dtype and cos_sin_cache.dtype == torch.float32 and cos_sin_cache.dim() == 2
                 and cos_sin_cache.shape[1] == head_dim and head_dim % 2 == 0 and positions.dim() == 1
                 and q.shape[1] % head_dim == 0 and k.shape[1] % head_dim == 0)
    module = load() if supported else None
    if module is None:
        return reference.rotary_embedding(positions, q, k, cos_sin_cache, head_dim)
    if q.stride(1) != 1:
        q = q.contiguous()
    if k.stride(1) != 1:
        k = k.contiguous()
    if cos_sin_cache.stride(1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    if positions.dtype != torch.int64 or not positions.is_contiguous():
        positions = positions.to(torch.int64).contiguous()
    q_out, k_out = module.rotary_embedding(positions, q, k, cos_sin_cache, int(head_dim))
    return q_out, k_out


def vnni_matmul_supported() -> bool:
    """Whether int4_matmul and int8_matmul run here: the extension builds and its compiler targets AVX-512 VNNI."""
    module = load()
    return module is not None and module.vnni_matmul_supported()


def _vnni_module(name: str) -> ModuleType:
    module = load()
    if module is None:
        raise RuntimeError(f"{name} needs lmport's CPU C++ kernels, which could not be built")
    return module


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """bf16 x [M, K] times int4 weights in lmport.kernels.cpu_vnni's layout (lmport.engine.quantization.pack_int4
    builds it) -> bf16 [M, N]; x is rounded to int8 per 32 channels. Only where vnni_matmul_supported()."""
    return _vnni_module("int4_matmul").int4_matmul(x.contiguous(), packed, scales, offsets)


def int8_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """bf16 x [M, K] times int8 weights in lmport.kernels.cpu_vnni's layout (lmport.engine.quantization.pack_int8
    builds it) -> bf16 [M, N]; x is rounded to int8 per 32 channels. Only where vnni_matmul_supported()."""
    return _vnni_module("int8_matmul").int8_matmul(x.contiguous(), packed, scales)


def _bench(argv: list[str] | None = None) -> None:
    """Micro-benchmark against the reference: `python -m lmport.kernels.cpu [--threads 2] [--dtype bfloat16]`.

    Defaults are SmolLM2-135M's decode shape (Hq 9, Hkv 3, D 64, block 16), 64 sequences of 180-209 tokens scattered
    over a 4096-block cache. Reference and kernel rounds of 50 calls alternate; the best round of each is reported
    (the machine may be shared).

    --cold measures what a decode step sees instead: 30 layers, each with its own cache, and a layer's weights (9 MB
    of bf16) read between two calls, so every call finds its K/V rows out of the CPU caches. Only the calls are timed.
    """
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="python -m lmport.kernels.cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cold", action="store_true", help="K/V out of the CPU caches at every call, as in a step")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    batch, q_heads, kv_heads, head_dim, block_size, num_blocks = args.batch, 9, 3, 64, 16, 4096
    per_seq = -(-(args.context + 10) // block_size)
    layers = 30 if args.cold else 1
    caches = [(torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype),
               torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)) for _ in range(layers)]
    k_cache, v_cache = caches[0]
    layer_weights = torch.ones(4_500_000, dtype=torch.bfloat16) if args.cold else None
    tables = torch.randperm(num_blocks - 1)[:batch * per_seq].add(1).view(batch, per_seq).to(torch.int32)
    lens = torch.randint(args.context - 20, args.context + 10, (batch,), dtype=torch.int32)
    q = torch.randn(batch, q_heads, head_dim).to(dtype)
    if not available():
        raise SystemExit("the extension did not build")
    functions = {"reference": reference.paged_attention_decode, "kernel": paged_attention_decode}
    torch.testing.assert_close(paged_attention_decode(q, k_cache, v_cache, tables, lens, 0.125).float(),
                               reference.paged_attention_decode(q, k_cache, v_cache, tables, lens, 0.125).float(),
                               atol=2e-2, rtol=2e-2)
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(args.rounds):
        for name, fn in functions.items():
            seconds, calls = 0.0, 0
            for k, v in caches if args.cold else [(k_cache, v_cache)] * 50:
                if args.cold:
                    layer_weights.sum()  # evicts the previous layer's K/V, as the step's matmuls do
                start = time.perf_counter()
                fn(q, k, v, tables, lens, 0.125)
                seconds += time.perf_counter() - start
                calls += 1
            best[name] = min(best[name], seconds / calls * 1e3)
    print(f"threads={args.threads} {args.dtype} batch={batch} context~{args.context}"
          f"{' (cold caches)' if args.cold else ''}: reference "
          f"{best['reference']:.3f} ms/layer, kernel {best['kernel']:.3f} ms/layer, "
          f"speed-up {best['reference'] / best['kernel']:.2f}x")


if __name__ == "__main__":
    _bench()
