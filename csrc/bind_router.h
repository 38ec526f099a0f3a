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
  PyRouter(py::object gate, int64_t top_k, bool normalize, const std::string& score, int64_t groups,
           int64_t topk_groups, float scale, const py::object& bias)
      : gate_(std::move(gate)) {
    if (!py::isinstance<PyLinear>(gate_)) bad_arg("gate", "expected a _native.Linear");
    LinearLayer& g = gate_.cast<PyLinear&>().layer();
    RouterSelect select;
    select.normalize = normalize;
    if (score == "sigmoid")
      select.score = RouterSelect::Score::kSigmoid;
    else if (score != "softmax")
      bad_arg("score", "expected 'softmax' or 'sigmoid', got '" + score + "'");
    select.groups = groups;
    select.topk_groups = topk_groups;
    select.scale = scale;
    if (!bias.is_none()) {
      if (select.score != RouterSelect::Score::kSigmoid) bad_arg("bias", "only the sigmoid router takes a bias");
      const py::array b = checked_array(bias, "bias", py::dtype::of<float>(), "float32", {g.spec().rows});
      const auto* p = static_cast<const float*>(b.data());
      select.bias.assign(p, p + g.spec().rows);
    }
    try {
      layer_ = std::make_unique<RouterLayer>(g, top_k, std::move(select));
    } catch (const std::invalid_argument& e) {  // the message starts with the field's name
      const std::string msg = e.what();
      throw py::value_error("argument '" + msg.substr(0, msg.find(' ')) + "': " + msg);
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
