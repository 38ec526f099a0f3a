// The Python-facing MoE layer (bind_moe.cpp binds it as _native.MoE); shared with bindings of operators that
// run a MoE layer inside their own pool jobs (bind_decoder_layer.cpp).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "bind_args.h"
#include "bind_call.h"
#include "moe/moe.h"
#include "quant/kernels.h"
#include "runtime/node_buffer.h"
#include "runtime/thread_pool.h"

namespace ktinject {
namespace bind {

// One call in flight from one Python thread: the native call and the arrays it reads and writes.
struct PendingCall {
  std::unique_ptr<MoeCall> call;
  std::vector<py::object> arrays;
};

class PyMoe {
 public:
  PyMoe(int64_t num_experts, int64_t hidden, int64_t intermediate, int gate_type, int up_type, int down_type,
        const std::string& activation, bool gated, bool has_bias, float alpha, float limit, float softcap_gate,
        float softcap_up, int threads, int numa_nodes, const std::string& isa) {
    MoeSpec spec;
    spec.num_experts = num_experts;
    spec.hidden = hidden;
    spec.intermediate = intermediate;
    spec.gate_type = checked_type(gate_type, "gate_type");
    spec.up_type = checked_type(up_type, "up_type");
    spec.down_type = checked_type(down_type, "down_type");
    spec.act = checked_act_params(activation, gated, alpha, limit, softcap_gate, softcap_up);
    spec.has_bias = has_bias;
    const Isa chosen = checked_isa(isa);
    layer_ = std::make_unique<MoeLayer>(spec, checked_pool(threads, numa_nodes), chosen);
  }

  ~PyMoe() {
    // Calls never synced must end before the layer (and the arrays they use) go away.
    std::map<std::thread::id, PendingCall> pending = std::move(pending_);
    py::gil_scoped_release release;
    for (auto& entry : pending) entry.second.call->wait_until(MoeCall::Clock::time_point::max());
  }

  void load(int64_t first, const py::object& gate_obj, const py::object& up_obj, const py::object& down_obj) {
    const MoeSpec& s = layer_->spec();
    const py::dtype u8 = py::dtype::of<uint8_t>();
    const int64_t gate_rb = row_bytes(s.gate_type, s.hidden), up_rb = row_bytes(s.up_type, s.hidden);
    const int64_t down_rb = row_bytes(s.down_type, s.intermediate);
    py::array gate;  // stays empty when the experts are not gated
    if (s.act.gated)
      gate = checked_array(gate_obj, "gate", u8, "uint8", {-1, s.intermediate, gate_rb});
    else if (!gate_obj.is_none())
      bad_arg("gate", "must be None: these experts are not gated");
    const int64_t expected_n = s.act.gated ? gate.shape(0) : -1;
    const py::array up = checked_array(up_obj, "up", u8, "uint8", {expected_n, s.intermediate, up_rb});
    const int64_t n = up.shape(0);
    const py::array down = checked_array(down_obj, "down", u8, "uint8", {n, s.hidden, down_rb});
    if (first < 0 || first + n > s.num_experts)
      bad_arg("first", "experts [" + std::to_string(first) + ", " + std::to_string(first + n) + ") exceed the " +
                           std::to_string(s.num_experts) + " experts");
    const auto* g = s.act.gated ? static_cast<const uint8_t*>(gate.data()) : nullptr;
    const auto* u = static_cast<const uint8_t*>(up.data());
    const auto* d = static_cast<const uint8_t*>(down.data());
    py::gil_scoped_release release;
    layer_->load(first, n, g, u, d);
  }

  void load_bias(const py::object& gate_obj, const py::object& up_obj, const py::object& down_obj) {
    const MoeSpec& s = layer_->spec();
    const py::dtype f32 = py::dtype::of<float>();
    py::array g;  // stays empty when the experts are not gated
    if (s.act.gated)
      g = checked_array(gate_obj, "gate_bias", f32, "float32", {s.num_experts, s.intermediate});
    else if (!gate_obj.is_none())
      bad_arg("gate_bias", "must be None: these experts are not gated");
    const py::array u = checked_array(up_obj, "up_bias", f32, "float32", {s.num_experts, s.intermediate});
    const py::array d = checked_array(down_obj, "down_bias", f32, "float32", {s.num_experts, s.hidden});
    try {
      py::gil_scoped_release release;
      layer_->load_bias(s.act.gated ? static_cast<const float*>(g.data()) : nullptr,
                        static_cast<const float*>(u.data()), static_cast<const float*>(d.data()));
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  }

  // A call's arguments, checked: arrays of the right dtype, shape and layout.
  struct CallArrays {
    py::array x, ids, w, out;
    int64_t tokens, top_k;
  };
  CallArrays checked_call(const py::object& x_obj, const py::object& ids_obj, const py::object& w_obj,
                          const py::object& out_obj) const {
    const MoeSpec& s = layer_->spec();
    CallArrays a;
    a.x = checked_array(x_obj, "hidden_states", py::dtype::of<float>(), "float32", {-1, s.hidden});
    a.tokens = a.x.shape(0);
    a.ids = checked_array(ids_obj, "top_k_index", py::dtype::of<int64_t>(), "int64", {a.tokens, -1});
    a.top_k = a.ids.shape(1);
    a.w = checked_array(w_obj, "top_k_weights", py::dtype::of<float>(), "float32", {a.tokens, a.top_k});
    a.out = checked_array(out_obj, "out", py::dtype::of<float>(), "float32", {a.tokens, s.hidden});
    if (!a.out.writeable()) bad_arg("out", "must be writeable");
    return a;
  }
  std::unique_ptr<MoeCall> start(CallArrays& a) {
    auto call = std::make_unique<MoeCall>(
        *layer_, static_cast<const float*>(a.x.data()), a.tokens, static_cast<const int64_t*>(a.ids.data()),
        static_cast<const float*>(a.w.data()), a.top_k, static_cast<float*>(a.out.mutable_data()));
    try {
      py::gil_scoped_release release;  // start() waits for the pool's job in flight
      layer_->submit(*call);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(std::string("argument 'top_k_index': ") + e.what());
    }
    return call;
  }

  void submit(const py::object& x_obj, const py::object& ids_obj, const py::object& w_obj, const py::object& out_obj) {
    CallArrays a = checked_call(x_obj, ids_obj, w_obj, out_obj);
    const std::thread::id me = std::this_thread::get_id();
    if (pending_.count(me))
      throw CallOrderError("submit() called twice from the same thread without sync() in between");
    std::unique_ptr<MoeCall> call = start(a);
    pending_[me] = PendingCall{std::move(call), {a.x, a.ids, a.w, a.out}};
  }

  // submit() + sync() in one call (the arrays are the caller's for its whole duration).
  void run(const py::object& x_obj, const py::object& ids_obj, const py::object& w_obj, const py::object& out_obj) {
    CallArrays a = checked_call(x_obj, ids_obj, w_obj, out_obj);
    std::unique_ptr<MoeCall> call = start(a);
    finish_interruptibly(*call);
  }

  // Ends the calling thread's call in flight.
  void sync() {
    auto it = pending_.find(std::this_thread::get_id());
    if (it == pending_.end()) throw CallOrderError("sync() called without a submit() in flight from this thread");
    PendingCall pending = std::move(it->second);
    pending_.erase(it);
    finish_interruptibly(*pending.call);
  }

  bool pending() const { return pending_.count(std::this_thread::get_id()) != 0; }
  MoeLayer& layer() { return *layer_; }

 private:
  std::unique_ptr<MoeLayer> layer_;
  std::map<std::thread::id, PendingCall> pending_;  // by submitting thread; touched only with the GIL held
};

}  // namespace bind
}  // namespace ktinject
