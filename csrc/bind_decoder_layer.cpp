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

std::vector<float> norm_of(const py::object& obj, const char* name, int64_t hidden) {
  const py::array w = checked_array(obj, name, py::dtype::of<float>(), "float32", {hidden});
  const auto* p = static_cast<const float*>(w.data());
  return std::vector<float>(p, p + hidden);
}

class PyDecoderLayer {
 public:
  PyDecoderLayer(py::object attention, py::object router, py::object experts, const py::object& input_norm,
                 float input_eps, const py::object& post_norm, float post_eps)
      : parts_{attention, router, experts} {
    if (!py::isinstance<PyAttention>(attention)) bad_arg("attention", "expected a _native.Attention");
    if (!py::isinstance<PyRouter>(router)) bad_arg("router", "expected a _native.Router");
    if (!py::isinstance<PyMoe>(experts)) bad_arg("experts", "expected a _native.MoE");
    AttentionLayer& a = attention.cast<PyAttention&>().layer();
    const int64_t H = a.spec().hidden;
    try {
      layer_ = std::make_unique<DecoderLayer>(a, router.cast<PyRouter&>().layer(), experts.cast<PyMoe&>().layer(),
                                              norm_of(input_norm, "input_norm", H), input_eps,
                                              norm_of(post_norm, "post_norm", H), post_eps);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  }

  void pre(const py::object& x_obj, const py::object& cos_obj, const py::object& sin_obj, const py::object& q_obj,
           const py::object& k_obj, const py::object& v_obj) {
    const AttentionSpec& s = layer_->attention().spec();
    const py::array x = checked_array(x_obj, "x", py::dtype::of<float>(), "float32", {-1, s.hidden});
    const int64_t T = x.shape(0);
    const Rotary r(cos_obj, sin_obj, T, s.head_dim);
    const QkvOut o(q_obj, k_obj, v_obj, T, s);
    LayerPreCall call(*layer_, static_cast<const float*>(x.data()), T, r.cos, r.sin, r.rot, o.q, o.k, o.v);
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
    const py::array x = checked_array(x_obj, "x", py::dtype::of<float>(), "float32", {B, T, s.hidden});
    py::array out = out_array(out_obj, "out", {B, T, s.hidden});
    LayerPostCall call(*layer_, static_cast<const float*>(q.data()), B, T, keys, values, S, mask,
                       static_cast<const float*>(x.data()), static_cast<float*>(out.mutable_data()));
    run_call(call, [&] { layer_->submit(call); });
  }

  DecoderLayer& layer() { return *layer_; }

 private:
  py::object parts_[3];  // keep the attention, router and experts layers alive
  std::unique_ptr<DecoderLayer> layer_;
};

}  // namespace

void bind_decoder_layer(py::module_& m) {
  py::class_<PyDecoderLayer>(m, "DecoderLayer",
                             "A pre-norm MoE decoder layer in two pool jobs (see csrc/layer/decoder_layer.h).")
      .def(py::init<py::object, py::object, py::object, const py::object&, float, const py::object&, float>(),
           py::arg("attention"), py::arg("router"), py::arg("experts"), py::kw_only(), py::arg("input_norm"),
           py::arg("input_eps"), py::arg("post_norm"), py::arg("post_eps"),
           "Parts are _native.Attention, Router and MoE on one pool; norms float32 [hidden].")
      .def("pre", &PyDecoderLayer::pre, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("q"), py::arg("k"),
           py::arg("v"), "x float32 [T, hidden] -> q, k, v of RMSNorm_in(x) (as Attention.project).")
      .def("post", &PyDecoderLayer::post, py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("mask"),
           py::arg("x"), py::arg("out"),
           "q [B, T, heads*head_dim], the cache and mask (as Attention.attend), x float32 [B, T, hidden] -> out = "
           "x1 + experts(RMSNorm_post(x1)) with x1 = x + attention.")
      .def_property_readonly("threads", [](PyDecoderLayer& p) { return p.layer().pool().threads(); });
}

}  // namespace ktinject
