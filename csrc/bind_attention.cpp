// Python bindings of CPU attention (attention/attention.h). Arrays are checked here (dtype, shape, strides)
// and a mismatch raises ValueError naming the argument; the C++ layer trusts its inputs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "bind_attention.h"

namespace py = pybind11;

namespace ktinject {

using bind::PyAttention;

void bind_attention(py::module_& m) {
  py::class_<PyAttention>(m, "Attention",
                          "Attention on the CPU around a caller-owned KV cache (see csrc/attention/attention.h).")
      .def(py::init<py::object, py::object, py::object, py::object, int64_t, int64_t, int64_t, int64_t, float,
                    const py::object&, const py::object&, float>(),
           py::arg("q_proj"), py::arg("k_proj"), py::arg("v_proj"), py::arg("o_proj"), py::kw_only(), py::arg("hidden"),
           py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("scale"), py::arg("q_norm") = py::none(),
           py::arg("k_norm") = py::none(), py::arg("norm_eps") = 1e-6f,
           "Projections are _native.Linear layers on one pool; q_norm/k_norm float32 [head_dim] or None.")
      .def("project", &PyAttention::project, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("q"), py::arg("k"),
           py::arg("v"),
           "x float32 [T, hidden] -> q [T, heads*head_dim], k, v [T, kv_heads*head_dim] (q/k normed and rotated; "
           "cos/sin float32 [T, rot] or None).")
      .def("attend", &PyAttention::attend, py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("mask"),
           py::arg("out"),
           "q float32 [B, T, heads*head_dim]; keys/values [B, kv_heads, S, head_dim] float32 or int16 (bfloat16 "
           "bits), strided; mask None (causal) or [B or 1, T, S] bool (True: attend) or float32 (added); "
           "out float32 [B, T, hidden] = o_proj(attention).")
      .def("step", &PyAttention::step, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("keys"), py::arg("values"),
           py::arg("n_past"), py::arg("mask"), py::arg("out"),
           "x float32 [B, T, hidden] -> out float32 [B, T, hidden]: project, the new k, v written into keys/values "
           "[B, kv_heads, capacity, head_dim] (writeable buffers) at [n_past, n_past + T), attend over n_past + T "
           "keys, o_proj; one pool job.")
      .def_property_readonly("threads", [](PyAttention& p) { return p.layer().pool().threads(); });
}

}  // namespace ktinject
