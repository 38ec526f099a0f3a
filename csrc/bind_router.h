// The Python-facing MoE router (bind_router_norm.cpp binds it as _native.Router); shared with the decoder-layer
// binding.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bind_args.h"
#include "bind_call.h"
#include "bind_linear.h"
#include "moe/router.h"

namespace ktinject {
namespace bind {

inline py::array writeable(const py::object& obj, const char* name, const py::dtype& dtype, const char* dtype_name,
                           std::vector<int64_t> shape) {
  py::array a = checked_array(obj, name, dtype, dtype_name, std::move(shape));
  if (!a.writeable()) bad_arg(name, "must be writeable");
  return a;
}

class PyRouter {
 public:
  PyRouter(py::object gate, int64_t top_k, bool normalize) : gate_(std::move(gate)) {
    if (!py::isinstance<PyLinear>(gate_)) bad_arg("gate", "expected a _native.Linear");
    try {
      layer_ = std::make_unique<RouterLayer>(gate_.cast<PyLinear&>().layer(), top_k, normalize);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(std::string("argument 'top_k': ") + e.what());
    }
  }

  void route(const py::object& x_obj, const py::object& logits_obj, const py::object& weights_obj,
             const py::object& ids_obj) {
    const int64_t H = layer_->hidden(), E = layer_->experts(), k = layer_->top_k();
    const py::array x = checked_array(x_obj, "x", py::dtype::of<float>(), "float32", {-1, H});
    const int64_t T = x.shape(0);
    py::array logits = writeable(logits_obj, "logits", py::dtype::of<float>(), "float32", {T, E});
    py::array weights = writeable(weights_obj, "weights", py::dtype::of<float>(), "float32", {T, k});
    py::array ids = writeable(ids_obj, "ids", py::dtype::of<int64_t>(), "int64", {T, k});
    RouterCall call(*layer_, static_cast<const float*>(x.data()), T, static_cast<float*>(logits.mutable_data()),
                    static_cast<float*>(weights.mutable_data()), static_cast<int64_t*>(ids.mutable_data()));
    try {
      py::gil_scoped_release release;
      layer_->submit(call);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
    finish_interruptibly(call);
    py::gil_scoped_release release;
    call.finish_all();
  }

  RouterLayer& layer() { return *layer_; }

 private:
  py::object gate_;  // keeps the gate's linear layer alive
  std::unique_ptr<RouterLayer> layer_;
};

}  // namespace bind
}  // namespace ktinject
