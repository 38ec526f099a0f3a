// Python bindings of the CPU linear layer (linear/linear.h). Every array argument is checked here (dtype,
// shape, contiguity) and a mismatch raises ValueError naming the argument; the C++ layer trusts its inputs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bind_linear.h"

namespace py = pybind11;

namespace ktinject {

using bind::PyLinear;

void bind_linear(py::module_& m) {
  py::class_<PyLinear>(m, "Linear",
                       "A linear layer on the CPU over GGUF blocks or float rows (see csrc/linear/linear.h).")
      .def(py::init<int64_t, int64_t, int, bool, int, int, const std::string&>(), py::arg("out_features"),
           py::arg("in_features"), py::kw_only(), py::arg("type"), py::arg("has_bias") = false, py::arg("threads") = 0,
           py::arg("numa_nodes") = 0, py::arg("isa") = "auto",
           "type is a GGML type id. threads/numa_nodes 0 = all (the same pool as MoE layers with that layout).")
      .def("load", &PyLinear::load, py::arg("first"), py::arg("blocks"),
           "Pack rows [first, first + n) from GGUF blocks uint8 [n, row_bytes]; first a multiple of 16, n too "
           "unless the range ends at the last row. Blocks until done.")
      .def("load_bias", &PyLinear::load_bias, py::arg("bias"), "float32 [out_features].")
      .def("forward", &PyLinear::forward, py::arg("x"), py::arg("out"),
           "out = x . W^T (+ bias) for x float32 [T, in_features], out float32 [T, out_features]. Thread-safe; "
           "Ctrl-C cancels a long call within ~50 ms.")
      .def_property_readonly("isa", [](PyLinear& p) { return std::string(isa_name(p.layer().isa())); })
      .def_property_readonly("threads", [](PyLinear& p) { return p.layer().pool().threads(); })
      .def_property_readonly("numa_nodes", [](PyLinear& p) { return p.layer().pool().nodes(); })
      .def_property_readonly("cpus", [](PyLinear& p) { return p.layer().pool().layout().cpus; })
      .def_property_readonly("slices",
                             [](PyLinear& p) {
                               std::vector<std::pair<int64_t, int64_t>> s;
                               for (int n = 0; n < p.layer().pool().nodes(); ++n) s.push_back(p.layer().slice(n));
                               return s;
                             })
      .def_property_readonly("weight_bytes", [](PyLinear& p) { return p.layer().weight_bytes(); });
}

}  // namespace ktinject
