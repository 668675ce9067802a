"""C++ source of the CPU decode stack: one call runs a decode step's embedding, every Llama-family decoder layer and
the final norm, compiled into the lmport.kernels.cpu extension (it calls that extension's kernels directly).

Why: at decode batch sizes each of a small model's ops finishes in microseconds, and the Python around them (module
calls, kernel dispatch, lmport.kernels.cpu's argument checks) costs as much as the ops: torch.profiler puts "Python
and dispatch" at about a fifth of a SmolLM2-135M batch-1 step (docs/performance.md). This is the CPU counterpart of
lmport.engine.cuda_graphs: the step's ops are issued from C++, with the GIL released while they run.

The ops are those of the module path, in the same order, on the same kernels: rms_norm, the Linear's own matmul op
(oneDNN's packed bf16 `mkldnn::_linear_pointwise`, `_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`,
lmport's `int4_matmul` or `linear`), rotary_embedding, the K/V row copy into the paged cache, paged_attention_decode and silu_and_mul. So the
hidden states are bit-identical to the module path's (tests/test_engine_cpu_decode.py checks this for every Linear
kind); lmport.engine.cpu_decode decides which models and steps qualify.
"""

from __future__ import annotations

DECODER_SOURCE = r"""
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/record_function.h>

// ---- the decode stack (lmport.kernels.cpu_decoder): every layer of a decode step in one call
namespace {

// oneDNN's packed bf16 linear, the op Linear calls from Python; boxed, so no C++ signature has to match its schema
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, packed, bias.has_value() ? c10::IValue(*bias) : c10::IValue(), std::string("none"),
                          c10::List<c10::optional<at::Scalar>>(), std::string("")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// K/V rows [T, Hkv*D] (rows may be strided views) into a contiguous cache [blocks, block_size, Hkv, D] at slots;
// slot -1 is skipped, as in kernels.store_kv_cache
void store_rows(const at::Tensor& rows, const at::Tensor& cache, const int64_t* slots) {
  const int64_t row_bytes = rows.size(1) * rows.element_size();
  const int64_t src_stride = rows.stride(0) * rows.element_size();
  const char* src = static_cast<const char*>(rows.data_ptr());
  char* dst = static_cast<char*>(cache.data_ptr());
  for (int64_t t = 0; t < rows.size(0); ++t)
    if (slots[t] >= 0) std::memcpy(dst + slots[t] * row_bytes, src + t * src_stride, row_bytes);
}

// fn() under a torch.profiler label named as lmport.bridge.bench_profile's (its Python wrappers are not called here)
template <typename Fn>
auto recorded(const char* label, Fn&& fn) {
  RECORD_FUNCTION(label, std::vector<c10::IValue>());
  return fn();
}

}  // namespace

struct FusedLinear {
  enum class Kind { plain, packed, int8, int4, w4a8, w8a8 };
  Kind kind;
  at::Tensor weight;   // plain [N, K]; packed: oneDNN's layout; int8 [N, K]; int4: _convert_weight_to_int4pack's;
                       // w4a8, w8a8: lmport.kernels.cpu_vnni's
  at::Tensor scales;   // int8: per-channel scales; int4: scales_and_zeros; w4a8, w8a8: block scales; else undefined
  at::Tensor offsets;  // w4a8: block offsets; else undefined
  int64_t group_size;
  c10::optional<at::Tensor> bias;

  FusedLinear(const std::string& kind_name, at::Tensor weight, c10::optional<at::Tensor> scales,
              c10::optional<at::Tensor> offsets, int64_t group_size, c10::optional<at::Tensor> bias)
      : weight(std::move(weight)), scales(scales.value_or(at::Tensor())), offsets(offsets.value_or(at::Tensor())),
        group_size(group_size), bias(std::move(bias)) {
    if (kind_name == "plain") kind = Kind::plain;
    else if (kind_name == "packed") kind = Kind::packed;
    else if (kind_name == "int8") kind = Kind::int8;
    else if (kind_name == "int4") kind = Kind::int4;
    else if (kind_name == "w4a8") kind = Kind::w4a8;
    else if (kind_name == "w8a8") kind = Kind::w8a8;
    else TORCH_CHECK(false, "FusedLinear kind must be plain, packed, int8, int4, w4a8 or w8a8; got ", kind_name);
    TORCH_CHECK((kind == Kind::plain || kind == Kind::packed) || this->scales.defined(), kind_name, " needs scales");
    TORCH_CHECK(kind != Kind::w4a8 || this->offsets.defined(), "w4a8 needs offsets");
  }

  at::Tensor operator()(const at::Tensor& x) const {
    switch (kind) {
      case Kind::plain: return at::linear(x, weight, bias);
      case Kind::packed: return packed_linear(x, weight, bias);
      case Kind::int8: return with_bias(at::_weight_int8pack_mm(x.contiguous(), weight, scales));
      case Kind::int4: return with_bias(at::_weight_int4pack_mm_for_cpu(x, weight, group_size, scales));
      case Kind::w4a8: return with_bias(int4_matmul(x.contiguous(), weight, scales, offsets));
      case Kind::w8a8: return with_bias(int8_matmul(x.contiguous(), weight, scales));
    }
    TORCH_CHECK(false, "unreachable");
  }

 private:
  at::Tensor with_bias(at::Tensor y) const { return bias.has_value() ? y + *bias : y; }
};

struct DecoderLayer {
  at::Tensor input_norm, post_norm;
  double input_eps, post_eps;
  c10::optional<at::Tensor> q_norm, k_norm;  // one RMSNorm over head_dim for every head (Qwen3), or none
  double qk_eps;
  FusedLinear qkv, o, gate_up, down;
  at::Tensor k_cache, v_cache;  // this layer's [num_blocks, block_size, Hkv, D] views of the runner's cache
  double scale, soft_cap;  // soft_cap 0: none
  int64_t window;  // 0: global attention

  DecoderLayer(at::Tensor input_norm, double input_eps, at::Tensor post_norm, double post_eps,
               c10::optional<at::Tensor> q_norm, c10::optional<at::Tensor> k_norm, double qk_eps, FusedLinear qkv,
               FusedLinear o, FusedLinear gate_up, FusedLinear down, at::Tensor k_cache, at::Tensor v_cache,
               double scale, int64_t window, double soft_cap)
      : input_norm(std::move(input_norm)), post_norm(std::move(post_norm)), input_eps(input_eps),
        post_eps(post_eps), q_norm(std::move(q_norm)), k_norm(std::move(k_norm)), qk_eps(qk_eps),
        qkv(std::move(qkv)), o(std::move(o)), gate_up(std::move(gate_up)), down(std::move(down)),
        k_cache(std::move(k_cache)), v_cache(std::move(v_cache)), scale(scale), soft_cap(soft_cap),
        window(window) {
    TORCH_CHECK(this->k_cache.is_contiguous() && this->v_cache.is_contiguous() && this->k_cache.dim() == 4 &&
                this->k_cache.sizes() == this->v_cache.sizes(), "k_cache / v_cache: contiguous [N, bs, Hkv, D]");
    TORCH_CHECK(this->q_norm.has_value() == this->k_norm.has_value(), "q_norm and k_norm come together");
  }
};

struct DecoderStack {
  at::Tensor embedding, final_norm, cos_sin_cache;
  double final_eps;
  int64_t num_heads, num_kv_heads, head_dim;
  std::vector<DecoderLayer> layers;

  DecoderStack(at::Tensor embedding, at::Tensor final_norm, double final_eps, at::Tensor cos_sin_cache,
               int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, std::vector<DecoderLayer> layers)
      : embedding(std::move(embedding)), final_norm(std::move(final_norm)), cos_sin_cache(std::move(cos_sin_cache)),
        final_eps(final_eps), num_heads(num_heads), num_kv_heads(num_kv_heads), head_dim(head_dim),
        layers(std::move(layers)) {
    TORCH_CHECK(!this->layers.empty(), "a decode stack needs at least one layer");
    for (const DecoderLayer& layer : this->layers)
      TORCH_CHECK(layer.k_cache.size(2) == num_kv_heads && layer.k_cache.size(3) == head_dim &&
                  layer.k_cache.scalar_type() == this->embedding.scalar_type(),
                  "each layer's cache must be [N, bs, num_kv_heads, head_dim] in the model dtype");
  }

  // input_ids, positions, slot_mapping int64 [T]; block_tables int32 [T, M]; seq_lens int32 [T]: one decode token
  // per sequence. Returns the final-normed hidden states [T, H], as LlamaModel.forward does.
  at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& slot_mapping,
                     const at::Tensor& block_tables, const at::Tensor& seq_lens) const {
    const int64_t T = input_ids.size(0);
    TORCH_CHECK(positions.numel() == T && slot_mapping.numel() == T && slot_mapping.is_contiguous() &&
                slot_mapping.scalar_type() == at::kLong, "positions / slot_mapping: int64 [T]");
    const int64_t* slots = slot_mapping.data_ptr<int64_t>();
    const int64_t num_slots = layers[0].k_cache.size(0) * layers[0].k_cache.size(1);
    for (int64_t t = 0; t < T; ++t) TORCH_CHECK(slots[t] < num_slots, "slot ", slots[t], " is past the cache");
    const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
    at::Tensor hidden = at::embedding(embedding, input_ids), residual;
    const auto norm = [](const at::Tensor& x, const at::Tensor& weight, double eps,
                         const c10::optional<at::Tensor>& add) {
      return recorded("lmport::rms_norm", [&] { return rms_norm(x, weight, eps, add); });
    };
    for (const DecoderLayer& layer : layers) {
      std::vector<at::Tensor> normed = norm(hidden, layer.input_norm, layer.input_eps,
                                            residual.defined() ? c10::optional<at::Tensor>(residual) : c10::nullopt);
      residual = residual.defined() ? normed[1] : hidden;  // the first layer starts the residual stream
      const at::Tensor qkv = layer.qkv(normed[0]);
      at::Tensor q = qkv.narrow(1, 0, q_size), k = qkv.narrow(1, q_size, kv_size);
      const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size);
      if (layer.q_norm.has_value()) {
        q = norm(q.reshape({-1, head_dim}), *layer.q_norm, layer.qk_eps, c10::nullopt)[0].view({T, q_size});
        k = norm(k.reshape({-1, head_dim}), *layer.k_norm, layer.qk_eps, c10::nullopt)[0].view({T, kv_size});
      }
      std::vector<at::Tensor> rotated = recorded("lmport::rotary_embedding", [&] {
        return rotary_embedding(positions, q, k, cos_sin_cache, head_dim);
      });
      recorded("lmport::store_kv_cache", [&] {
        store_rows(rotated[1], layer.k_cache, slots);
        store_rows(v, layer.v_cache, slots);
        return 0;
      });
      const at::Tensor attended = recorded("lmport::paged_attention_decode", [&] {
        return paged_attention_decode(rotated[0].view({T, num_heads, head_dim}), layer.k_cache, layer.v_cache,
                                      block_tables, seq_lens, layer.scale, layer.window, layer.soft_cap);
      });
      normed = norm(layer.o(attended.view({T, q_size})), layer.post_norm, layer.post_eps, residual);
      residual = normed[1];
      const at::Tensor gate_up = layer.gate_up(normed[0]);
      hidden = layer.down(recorded("lmport::silu_and_mul", [&] { return silu_and_mul(gate_up); }));
    }
    return norm(hidden, final_norm, final_eps, residual)[0];
  }
};
"""

DECODER_BINDINGS = r"""
  py::class_<FusedLinear>(m, "FusedLinear")
      .def(py::init<std::string, at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>, int64_t,
                    c10::optional<at::Tensor>>(),
           py::arg("kind"), py::arg("weight"), py::arg("scales"), py::arg("offsets"), py::arg("group_size"),
           py::arg("bias"));
  py::class_<DecoderLayer>(m, "DecoderLayer")
      .def(py::init<at::Tensor, double, at::Tensor, double, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
                    double, FusedLinear, FusedLinear, FusedLinear, FusedLinear, at::Tensor, at::Tensor, double,
                    int64_t, double>(),
           py::arg("input_norm"), py::arg("input_eps"), py::arg("post_norm"), py::arg("post_eps"), py::arg("q_norm"),
           py::arg("k_norm"), py::arg("qk_eps"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"), py::arg("down"),
           py::arg("k_cache"), py::arg("v_cache"), py::arg("scale"), py::arg("window"), py::arg("soft_cap"));
  py::class_<DecoderStack>(m, "DecoderStack")
      .def(py::init<at::Tensor, at::Tensor, double, at::Tensor, int64_t, int64_t, int64_t,
                    std::vector<DecoderLayer>>(),
           py::arg("embedding"), py::arg("final_norm"), py::arg("final_eps"), py::arg("cos_sin_cache"),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("layers"))
      .def("forward", &DecoderStack::forward, py::arg("input_ids"), py::arg("positions"), py::arg("slot_mapping"),
           py::arg("block_tables"), py::arg("seq_lens"), py::call_guard<py::gil_scoped_release>());
"""
