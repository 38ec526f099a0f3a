// Python bindings of the MoE router (moe/router.h) and RMSNorm (norm/rms_norm.h). Arrays are checked here and
// a mismatch raises ValueError naming the argument.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bind_args.h"
#include "bind_call.h"
#include "bind_router.h"
#include "norm/rms_norm.h"

namespace py = pybind11;

namespace ktinject {
namespace {

using namespace bind;

void rms_norm(const py::object& x_obj, const py::object& w_obj, float eps, const py::object& out_obj) {
  const py::array w = checked_array(w_obj, "weight", py::dtype::of<float>(), "float32", {-1});
  const int64_t dim = w.shape(0);
  const py::array x = checked_array(x_obj, "x", py::dtype::of<float>(), "float32", {-1, dim});
  py::array out = writeable(out_obj, "out", py::dtype::of<float>(), "float32", {x.shape(0), dim});
  if (!(eps >= 0.0f) || !std::isfinite(eps)) bad_arg("eps", "must be finite and >= 0");
  rms_norm_rows(static_cast<const float*>(x.data()), static_cast<const float*>(w.data()), x.shape(0), dim, eps,
                static_cast<float*>(out.mutable_data()));
}

}  // namespace

void bind_router_norm(py::module_& m) {
  py::class_<PyRouter>(m, "Router", "Softmax or grouped-sigmoid top-k MoE router on the CPU (see csrc/moe/router.h).")
      .def(py::init<py::object, int64_t, bool, const std::string&, int64_t, int64_t, float, const py::object&>(),
           py::arg("gate"), py::kw_only(), py::arg("top_k"), py::arg("normalize"), py::arg("score") = "softmax",
           py::arg("groups") = 1, py::arg("topk_groups") = 1, py::arg("scale") = 1.0f, py::arg("bias") = py::none(),
           "gate: a _native.Linear [experts, hidden]; score 'softmax' (Qwen3-MoE form) or 'sigmoid' (DeepSeek-V3 "
           "form: groups, topk_groups, scale and bias float32 [experts] or None apply to it).")
      .def("route", &PyRouter::route, py::arg("x"), py::arg("logits"), py::arg("weights"), py::arg("ids"),
           "x float32 [T, hidden] -> logits float32 [T, experts], weights float32 [T, top_k], ids int64 [T, top_k].")
      .def_property_readonly("threads", [](PyRouter& p) { return p.layer().pool().threads(); });
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("out"),
        "out = x / sqrt(mean(x^2) + eps) * weight for x, out float32 [rows, dim] (may be the same), weight [dim].");
}

}  // namespace ktinject
