// Python bindings of the CPU linear layer (linear/linear.h). Every array argument is checked here (dtype,
// shape, contiguity) and a mismatch raises ValueError naming the argument; the C++ layer trusts its inputs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bind_args.h"
#include "bind_call.h"
#include "linear/linear.h"
#include "runtime/thread_pool.h"

namespace py = pybind11;

namespace ktinject {
namespace {

using namespace bind;

class PyLinear {
 public:
  PyLinear(int64_t out_features, int64_t in_features, int type, bool has_bias, int threads, int numa_nodes,
           const std::string& isa) {
    LinearSpec spec;
    spec.rows = out_features;
    spec.cols = in_features;
    spec.type = checked_type(type, "type");
    spec.has_bias = has_bias;
    const Isa chosen = checked_isa(isa);
    PoolLayout layout;
    try {
      layout = choose_layout(threads, numa_nodes);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
    layer_ = std::make_unique<LinearLayer>(spec, ThreadPool::get(layout), chosen);
  }

  void load(int64_t first, const py::object& blocks_obj) {
    const LinearSpec& s = layer_->spec();
    const int64_t rb = row_bytes(s.type, s.cols);
    const py::array blocks = checked_array(blocks_obj, "blocks", py::dtype::of<uint8_t>(), "uint8", {-1, rb});
    const auto* data = static_cast<const uint8_t*>(blocks.data());
    const int64_t n = blocks.shape(0);
    try {
      py::gil_scoped_release release;
      layer_->load(first, n, data);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(std::string("argument 'first': ") + e.what());
    }
  }

  void load_bias(const py::object& bias_obj) {
    const py::array b = checked_array(bias_obj, "bias", py::dtype::of<float>(), "float32", {layer_->spec().rows});
    try {
      py::gil_scoped_release release;
      layer_->load_bias(static_cast<const float*>(b.data()));
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  }

  // out[T, out_features] = x[T, in_features] . W^T (+ bias); blocks until done (interruptible).
  void forward(const py::object& x_obj, const py::object& out_obj) {
    const LinearSpec& s = layer_->spec();
    const py::array x = checked_array(x_obj, "x", py::dtype::of<float>(), "float32", {-1, s.cols});
    const int64_t T = x.shape(0);
    py::array out = checked_array(out_obj, "out", py::dtype::of<float>(), "float32", {T, s.rows});
    if (!out.writeable()) bad_arg("out", "must be writeable");
    LinearCall call(*layer_, static_cast<const float*>(x.data()), T, static_cast<float*>(out.mutable_data()));
    try {
      py::gil_scoped_release release;  // start() waits for the pool's job in flight
      layer_->submit(call);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
    finish_interruptibly(call);
  }

  LinearLayer& layer() { return *layer_; }

 private:
  std::unique_ptr<LinearLayer> layer_;
};

}  // namespace

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
