// The Python-facing CPU linear layer (bind_linear.cpp binds it as _native.Linear); shared with the bindings
// of operators that chain linear layers in their own pool jobs (bind_attention.cpp).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <stdexcept>
#include <string>

#include "bind_args.h"
#include "bind_call.h"
#include "linear/linear.h"
#include "runtime/thread_pool.h"

namespace ktinject {
namespace bind {

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
    layer_ = std::make_unique<LinearLayer>(spec, checked_pool(threads, numa_nodes), chosen);
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

}  // namespace bind
}  // namespace ktinject
