// Python bindings of the fused decoder layer (layer/decoder_layer.h). Arrays are checked here (the same checks
// as the attention binding's) and a mismatch raises ValueError naming the argument.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bind_attention.h"
#include "bind_moe.h"
#include "bind_router.h"
#include "layer/decoder_layer.h"

namespace py = pybind11;

namespace ktinject {
namespace {

using namespace bind;

// float32, or int16 holding bfloat16 bits (numpy has no bfloat16); C-contiguous.
py::array stream_array(const py::object& obj, const char* name, std::vector<int64_t> shape, bool* bf16) {
  const py::array a = as_array(obj, name);
  *bf16 = same_dtype(a.dtype(), py::dtype::of<int16_t>()) || same_dtype(a.dtype(), py::dtype::of<uint16_t>());
  if (*bf16) return checked_array(obj, name, a.dtype(), "int16", std::move(shape));
  return checked_array(obj, name, py::dtype::of<float>(), "float32 or int16 (bfloat16 bits)", std::move(shape));
}

StreamIn stream_in(const py::array& a, bool bf16) { return StreamIn{a.data(), bf16}; }

StreamOut stream_out(py::array& a, const char* name, bool bf16) {
  if (!a.writeable()) bad_arg(name, "must be writeable");
  return StreamOut{a.mutable_data(), bf16};
}

class PyDecoderLayer {
 public:
  PyDecoderLayer(py::object attention, py::object router, py::object experts, py::object mlp_gate, py::object mlp_up,
                 py::object mlp_down, py::object mlp_shared_gate, const py::object& input_norm, float input_eps,
                 const py::object& post_norm, float post_eps)
      : parts_{attention, router, experts, mlp_gate, mlp_up, mlp_down, mlp_shared_gate} {
    if (!py::isinstance<PyAttention>(attention)) bad_arg("attention", "expected a _native.Attention");
    if (!router.is_none() && !py::isinstance<PyRouter>(router)) bad_arg("router", "expected a _native.Router or None");
    if (!experts.is_none() && !py::isinstance<PyMoe>(experts)) bad_arg("experts", "expected a _native.MoE or None");
    MlpLayers mlp;
    LinearLayer** slots[] = {&mlp.gate, &mlp.up, &mlp.down, &mlp.shared_gate};
    const char* names[] = {"mlp_gate", "mlp_up", "mlp_down", "mlp_shared_gate"};
    for (int i = 0; i < 4; ++i) {
      const py::object& part = parts_[3 + i];
      if (part.is_none()) continue;
      if (!py::isinstance<PyLinear>(part)) bad_arg(names[i], "expected a _native.Linear or None");
      *slots[i] = &part.cast<PyLinear&>().layer();
    }
    AttentionLayer& a = attention.cast<PyAttention&>().layer();
    const int64_t H = a.spec().hidden;
    try {
      layer_ = std::make_unique<DecoderLayer>(a, router.is_none() ? nullptr : &router.cast<PyRouter&>().layer(),
                                              experts.is_none() ? nullptr : &experts.cast<PyMoe&>().layer(), mlp,
                                              norm_weights(input_norm, "input_norm", H), input_eps,
                                              norm_weights(post_norm, "post_norm", H), post_eps);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  }

  void pre(const py::object& x_obj, const py::object& cos_obj, const py::object& sin_obj, const py::object& q_obj,
           const py::object& k_obj, const py::object& v_obj) {
    const AttentionSpec& s = layer_->attention().spec();
    bool x_bf16, k_bf16, v_bf16;
    const py::array x = stream_array(x_obj, "x", {-1, s.hidden}, &x_bf16);
    const int64_t T = x.shape(0);
    const Rotary r(cos_obj, sin_obj, T, s.head_dim);
    py::array q = out_array(q_obj, "q", {T, s.heads * s.head_dim});
    py::array k = stream_array(k_obj, "k", {T, s.kv_heads * s.head_dim}, &k_bf16);
    py::array v = stream_array(v_obj, "v", {T, s.kv_heads * s.head_dim}, &v_bf16);
    LayerPreCall call(*layer_, stream_in(x, x_bf16), T, r.cos, r.sin, r.rot, static_cast<float*>(q.mutable_data()),
                      stream_out(k, "k", k_bf16), stream_out(v, "v", v_bf16));
    run_call(call, [&] { layer_->submit(call); });
  }

  void post(const py::object& q_obj, const py::object& k_obj, const py::object& v_obj, const py::object& mask_obj,
            const py::object& x_obj, const py::object& out_obj) {
    const AttentionSpec& s = layer_->attention().spec();
    const py::array q = checked_array(q_obj, "q", py::dtype::of<float>(), "float32", {-1, -1, s.heads * s.head_dim});
    const int64_t B = q.shape(0), T = q.shape(1);
    KvView keys, values;
    const int64_t S = cache_views(k_obj, v_obj, B, T, s.kv_heads, s.head_dim, &keys, &values);
    const MaskView mask = mask_view(mask_obj, B, T, S);
    bool x_bf16, out_bf16;
    const py::array x = stream_array(x_obj, "x", {B, T, s.hidden}, &x_bf16);
    py::array out = stream_array(out_obj, "out", {B, T, s.hidden}, &out_bf16);
    LayerPostCall call(*layer_, static_cast<const float*>(q.data()), B, T, keys, values, S, mask, stream_in(x, x_bf16),
                       stream_out(out, "out", out_bf16));
    run_call(call, [&] { layer_->submit(call); });
  }

  void step(const py::object& x_obj, const py::object& cos_obj, const py::object& sin_obj, const py::object& k_obj,
            const py::object& v_obj, int64_t n_past, const py::object& mask_obj, const py::object& out_obj) {
    const AttentionSpec& s = layer_->attention().spec();
    bool x_bf16, out_bf16;
    const py::array x = stream_array(x_obj, "x", {-1, -1, s.hidden}, &x_bf16);
    const int64_t B = x.shape(0), T = x.shape(1);
    py::array out = stream_array(out_obj, "out", {B, T, s.hidden}, &out_bf16);
    const Rotary r(cos_obj, sin_obj, B * T, s.head_dim);
    KvView keys, values;
    step_buffers(k_obj, v_obj, B, T, s.kv_heads, s.head_dim, n_past, &keys, &values);
    const MaskView mask = mask_view(mask_obj, B, T, n_past + T);
    LayerStepCall call(*layer_, stream_in(x, x_bf16), B, T, r.cos, r.sin, r.rot, keys, values, n_past, mask,
                       stream_out(out, "out", out_bf16));
    run_call(call, [&] { layer_->submit(call); });
  }

  DecoderLayer& layer() { return *layer_; }

 private:
  py::object parts_[7];  // keep the attention, router, experts and MLP layers alive
  std::unique_ptr<DecoderLayer> layer_;
};

}  // namespace

void bind_decoder_layer(py::module_& m) {
  py::class_<PyDecoderLayer>(m, "DecoderLayer",
                             "A pre-norm decoder layer in one or two pool jobs (see csrc/layer/decoder_layer.h).")
      .def(py::init<py::object, py::object, py::object, py::object, py::object, py::object, py::object,
                    const py::object&, float, const py::object&, float>(),
           py::arg("attention"), py::arg("router") = py::none(), py::arg("experts") = py::none(), py::kw_only(),
           py::arg("mlp_gate") = py::none(), py::arg("mlp_up") = py::none(), py::arg("mlp_down") = py::none(),
           py::arg("mlp_shared_gate") = py::none(), py::arg("input_norm"), py::arg("input_eps"), py::arg("post_norm"),
           py::arg("post_eps"),
           "Parts on one pool: _native.Attention; Router and MoE (routed experts), Linear gate/up/down (a SiLU-gated "
           "MLP: shared experts or a dense layer's; mlp_shared_gate [1, hidden]: its output scaled by the sigmoid "
           "of that), or both; norms float32 [hidden].")
      .def("pre", &PyDecoderLayer::pre, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("q"), py::arg("k"),
           py::arg("v"),
           "x [T, hidden] -> q float32, k, v of RMSNorm_in(x) (as Attention.project); x, k and v float32 or int16 "
           "(bfloat16 bits).")
      .def("post", &PyDecoderLayer::post, py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("mask"),
           py::arg("x"), py::arg("out"),
           "q [B, T, heads*head_dim], the cache and mask (as Attention.attend), x float32 [B, T, hidden] -> out = "
           "x1 + ffn(RMSNorm_post(x1)) with x1 = x + attention, ffn = routed experts and/or the MLP.")
      .def("step", &PyDecoderLayer::step, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("keys"),
           py::arg("values"), py::arg("n_past"), py::arg("mask"), py::arg("out"),
           "x [B, T, hidden] -> out: pre, the new k, v written into keys/values [B, kv_heads, capacity, head_dim] "
           "(writeable buffers, float32 or int16 bfloat16 bits) at [n_past, n_past + T), then post over n_past + T "
           "keys; one pool job.")
      .def_property_readonly("threads", [](PyDecoderLayer& p) { return p.layer().pool().threads(); });
}

}  // namespace ktinject
