"""C++ source of the CPU prefill attention kernel, compiled into `lmport.kernels.cpu`'s extension.

Varlen causal attention over the paged cache, flash-style: work items are (sequence, kv head, tile of 16 query
positions), each tile holding the queries of all the GQA group's heads; keys go by in tiles of 16, each converted to
fp32 once (K transposed, so one query's 16 scores are one vector) and used by every row of the query tile; softmax is
online (running max and sum), all in fp32. Key tiles wholly past a query tile's last position, or wholly before its
sliding window, are skipped: the masked half of a causal prompt is never computed, where torch's flash SDPA computes
most of it at serving lengths (docs/performance.md: about 110 GFLOPS there, counting the masked half).
It uses `to_float`, `from_float` and `exp_nonpos` of the decode kernel's source.
"""

PREFILL_SOURCE = r"""
namespace {

constexpr int64_t PREFILL_TILE = 16;  // query positions per work item, and keys per tile

// DC > 0: head_dim known at compile time (the loops over it unroll); 0: D at run time.
template <typename scalar_t, typename cache_t, int DC>
void prefill_tile(const scalar_t* q, int64_t q_s0, int64_t q_s1, const cache_t* k, const cache_t* v,
                  int64_t c_s0, int64_t c_s1, const int32_t* table, int64_t block_size, int64_t context,
                  int64_t first_row, int64_t rows, int64_t G, int64_t head_dim, float scale, int64_t window,
                  float soft_cap, scalar_t* out, int64_t o_s0, int64_t o_s1) {
  constexpr int64_t T = PREFILL_TILE;
  const int64_t D = DC > 0 ? DC : head_dim;
  const int64_t R = rows * G;  // row r = (position r / G, head r % G)
  std::vector<float> buf(R * D * 2 + 2 * R + 2 * T * D + R * T);
  float* Q = buf.data();
  float* O = Q + R * D;
  float* m = O + R * D;
  float* l = m + R;
  float* Kt = l + R;  // [D][T]
  float* V = Kt + T * D;  // [T][D]
  float* S = V + T * D;   // [R][T]
  std::vector<float> row(D);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = first_row + r / G, g = r % G;
    to_float(q + i * q_s0 + g * q_s1, Q + r * D, D);
    for (int64_t d = 0; d < D; ++d) Q[r * D + d] *= scale;
    std::fill(O + r * D, O + (r + 1) * D, 0.0f);
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.0f;
  }
  const int64_t lo_pos = context + first_row, hi_pos = context + first_row + rows - 1;
  const int64_t first_key = window > 0 ? std::max<int64_t>(0, lo_pos - window + 1) : 0;
  for (int64_t k0 = first_key - first_key % T; k0 <= hi_pos; k0 += T) {
    const int64_t n = std::min<int64_t>(T, hi_pos + 1 - k0);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t pos = k0 + j;
      if (pos < first_key) {  // before every row's window: masked, and its block may be freed (-1)
        for (int64_t d = 0; d < D; ++d) Kt[d * T + j] = 0.0f;
        std::fill(V + j * D, V + (j + 1) * D, 0.0f);
        continue;
      }
      const int64_t slot = static_cast<int64_t>(table[pos / block_size]) * c_s0 + (pos % block_size) * c_s1;
      to_float(k + slot, row.data(), D);
      for (int64_t d = 0; d < D; ++d) Kt[d * T + j] = row[d];
      to_float(v + slot, V + j * D, D);
    }
    for (int64_t j = n; j < T; ++j) {
      for (int64_t d = 0; d < D; ++d) Kt[d * T + j] = 0.0f;
      std::fill(V + j * D, V + (j + 1) * D, 0.0f);
    }
    // scores, four rows at a time (independent accumulator chains)
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) {
      float a0[T] = {}, a1[T] = {}, a2[T] = {}, a3[T] = {};
      const float *q0 = Q + r * D, *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
      for (int64_t d = 0; d < D; ++d) {
        const float* kd = Kt + d * T;
        const float x0 = q0[d], x1 = q1[d], x2 = q2[d], x3 = q3[d];
#pragma omp simd
        for (int64_t j = 0; j < T; ++j) {
          a0[j] += x0 * kd[j];
          a1[j] += x1 * kd[j];
          a2[j] += x2 * kd[j];
          a3[j] += x3 * kd[j];
        }
      }
      std::memcpy(S + r * T, a0, sizeof(a0));
      std::memcpy(S + (r + 1) * T, a1, sizeof(a1));
      std::memcpy(S + (r + 2) * T, a2, sizeof(a2));
      std::memcpy(S + (r + 3) * T, a3, sizeof(a3));
    }
    for (; r < R; ++r) {
      float a[T] = {};
      for (int64_t d = 0; d < D; ++d) {
        const float x = Q[r * D + d];
#pragma omp simd
        for (int64_t j = 0; j < T; ++j) a[j] += x * Kt[d * T + j];
      }
      std::memcpy(S + r * T, a, sizeof(a));
    }
    for (r = 0; r < R; ++r) {
      float* s = S + r * T;
      const int64_t p_last = context + first_row + r / G;  // the row's absolute position
      if (soft_cap > 0.0f)
        for (int64_t j = 0; j < T; ++j) s[j] = soft_cap * std::tanh(s[j] / soft_cap);
      // Only tiles on the diagonal, at a window's edge or past the last key need a mask.
      if (!(n == T && k0 + T - 1 <= p_last && (window <= 0 || p_last - k0 < window))) {
        for (int64_t j = 0; j < T; ++j) {
          const int64_t pos = k0 + j;
          const bool visible = j < n && pos <= p_last && (window <= 0 || p_last - pos < window);
          s[j] = visible ? s[j] : -std::numeric_limits<float>::infinity();
        }
      }
      float mx = m[r];
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < T; ++j) mx = std::max(mx, s[j]);
      if (mx == -std::numeric_limits<float>::infinity()) continue;  // nothing visible yet in this row
      const float alpha = exp_nonpos(m[r] - mx);  // exp(-inf) = 0 on the first visible tile
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < T; ++j) {
        s[j] = exp_nonpos(s[j] - mx);
        sum += s[j];
      }
      m[r] = mx;
      l[r] = l[r] * alpha + sum;
      float* o = O + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] *= alpha;
      for (int64_t j = 0; j < n; ++j) {
        const float p = s[j];
        const float* vj = V + j * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] += p * vj[d];
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = first_row + r / G, g = r % G;
    scalar_t* dst = out + i * o_s0 + g * o_s1;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    for (int64_t d = 0; d < D; ++d) from_float(O[r * D + d] * inv, dst + d);
  }
}

template <typename scalar_t, typename cache_t>
void prefill_run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& cu_seqlens, const at::Tensor& seq_lens, const at::Tensor& block_tables,
                 double scale, int64_t window, double soft_cap, at::Tensor& out) {
  const int64_t S = seq_lens.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t block_size = k_cache.size(1), Hkv = k_cache.size(2), G = Hq / Hkv;
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int64_t capacity = block_tables.size(1) * block_size;
  std::vector<std::array<int64_t, 3>> items;  // (sequence, kv head, first query row of the tile)
  for (int64_t s = 0; s < S; ++s) {
    const int64_t nq = cu[s + 1] - cu[s];
    TORCH_CHECK(lens[s] <= capacity, "seq_lens[", s, "] = ", lens[s], " exceeds the block table (", capacity, ")");
    TORCH_CHECK(nq >= 0 && nq <= lens[s], "sequence ", s, " has more queries than keys");
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t t = 0; t < nq; t += PREFILL_TILE) items.push_back({s, h, t});
  }
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const cache_t* kp = static_cast<const cache_t*>(k_cache.data_ptr());
  const cache_t* vp = static_cast<const cache_t*>(v_cache.data_ptr());
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t q_s0 = q.stride(0), q_s1 = q.stride(1), o_s0 = out.stride(0), o_s1 = out.stride(1);
  const int64_t c_s0 = k_cache.stride(0), c_s1 = k_cache.stride(1), c_s2 = k_cache.stride(2);
  TORCH_CHECK(c_s0 == v_cache.stride(0) && c_s1 == v_cache.stride(1) && c_s2 == v_cache.stride(2),
              "k_cache and v_cache must have the same strides");
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const auto [s, h, t] = items[w];
      const int64_t nq = cu[s + 1] - cu[s];
      const int64_t rows = std::min<int64_t>(PREFILL_TILE, nq - t);
      const int64_t start = cu[s];
      const auto tile = D == 64 ? prefill_tile<scalar_t, cache_t, 64>
                      : D == 128 ? prefill_tile<scalar_t, cache_t, 128>
                      : D == 32 ? prefill_tile<scalar_t, cache_t, 32> : prefill_tile<scalar_t, cache_t, 0>;
      tile(qp + start * q_s0 + h * G * q_s1, q_s0, q_s1, kp + h * c_s2, vp + h * c_s2, c_s0, c_s1,
           bt + s * block_tables.stride(0), block_size, lens[s] - nq, t, rows, G, D, static_cast<float>(scale),
           window, static_cast<float>(soft_cap), op + start * o_s0 + h * G * o_s1, o_s0, o_s1);
    }
  });
}

}  // namespace

at::Tensor paged_attention_prefill(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor cu_seqlens,
                                   at::Tensor seq_lens, at::Tensor block_tables, double scale, int64_t window,
                                   double soft_cap) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "q [N,Hq,D], caches [N,bs,Hkv,D]");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "the cache holds q's dtype");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0, "head shapes");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "last dim must be contiguous");
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
              block_tables.scalar_type() == at::kInt && cu_seqlens.is_contiguous() && seq_lens.is_contiguous() &&
              block_tables.stride(1) == 1, "int32 tables");
  TORCH_CHECK(cu_seqlens.size(0) == seq_lens.size(0) + 1 && block_tables.size(0) == seq_lens.size(0),
              "batch mismatch");
  at::Tensor out = at::empty_like(q);
  switch (q.scalar_type()) {
    case at::kFloat: prefill_run<float, float>(q, k_cache, v_cache, cu_seqlens, seq_lens, block_tables, scale,
                                               window, soft_cap, out); break;
    case at::kBFloat16: prefill_run<c10::BFloat16, c10::BFloat16>(q, k_cache, v_cache, cu_seqlens, seq_lens,
                                                                  block_tables, scale, window, soft_cap, out); break;
    case at::kHalf: prefill_run<c10::Half, c10::Half>(q, k_cache, v_cache, cu_seqlens, seq_lens, block_tables,
                                                      scale, window, soft_cap, out); break;
    default: TORCH_CHECK(false, "unsupported dtype ", q.scalar_type());
  }
  return out;
}
"""
