// Python bindings of the CPU MoE layer (moe/moe.h) and its thread pool. Every array argument is checked
// here (dtype, shape, contiguity) and a mismatch raises ValueError naming the argument; the C++ layer
// below trusts its inputs. Arrays handed to submit() are kept alive until sync().
// sync() waits interruptibly (bind_call.h): Ctrl-C ends a long call within ~50 ms, the layer stays usable.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

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

namespace py = pybind11;

namespace ktinject {
namespace {

using namespace bind;

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
    PoolLayout layout;
    try {
      layout = choose_layout(threads, numa_nodes);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
    layer_ = std::make_unique<MoeLayer>(spec, ThreadPool::get(layout), chosen);
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

}  // namespace

void bind_moe(py::module_& m) {
  // submit() twice from one thread without sync(), sync() without submit(): a ValueError subclass.
  py::register_local_exception<CallOrderError>(m, "CallOrderError", PyExc_ValueError);
  py::class_<PyMoe>(m, "MoE", "The routed experts of one MoE layer on the CPU (see csrc/moe/moe.h).")
      .def(py::init<int64_t, int64_t, int64_t, int, int, int, const std::string&, bool, bool, float, float, float,
                    float, int, int, const std::string&>(),
           py::arg("num_experts"), py::arg("hidden"), py::arg("intermediate"), py::kw_only(), py::arg("gate_type"),
           py::arg("up_type"), py::arg("down_type"), py::arg("activation") = "silu", py::arg("gated") = true,
           py::arg("has_bias") = false, py::arg("alpha") = 1.702f, py::arg("limit") = 7.0f,
           py::arg("softcap_gate") = 0.0f, py::arg("softcap_up") = 0.0f, py::arg("threads") = 0,
           py::arg("numa_nodes") = 0, py::arg("isa") = "auto",
           "Weight types are GGML type ids (gate_type is ignored when gated=False: there is no gate). activation: "
           "silu | gelu | gelu_tanh | relu | relu2 | quick_gelu (gated or not), gptoss_swiglu (alpha, limit), "
           "clamped_swiglu / swiglu_clamp_after (limit), softcapped_swiglu (softcap_gate, softcap_up). threads/"
           "numa_nodes 0 = all; numa_nodes above the machine's node count splits the CPUs into that many groups. "
           "isa: 'auto' (KTINJECT_ISA or the best) | 'avx512' | 'avx2' | 'scalar'.")
      .def("load", &PyMoe::load, py::arg("first"), py::arg("gate"), py::arg("up"), py::arg("down"),
           "Pack experts [first, first + n) from GGUF blocks: gate/up uint8 [n, intermediate, row_bytes] (gate None "
           "when not gated), down uint8 [n, hidden, row_bytes]. Blocks until done (runs on the pool).")
      .def("load_bias", &PyMoe::load_bias, py::arg("gate_bias"), py::arg("up_bias"), py::arg("down_bias"),
           "float32 [E, intermediate], [E, intermediate], [E, hidden].")
      .def("submit", &PyMoe::submit, py::arg("hidden_states"), py::arg("top_k_index"), py::arg("top_k_weights"),
           py::arg("out"),
           "Start out = MoE(hidden_states) (float32 [T, hidden]; top_k_index int64 [T, k]; top_k_weights float32 "
           "[T, k]) and return at once. The arrays are kept alive until sync(). Each thread may have one call "
           "in flight per layer (a second submit() from it raises CallOrderError); calls from several threads "
           "run one after the other.")
      .def("run", &PyMoe::run, py::arg("hidden_states"), py::arg("top_k_index"), py::arg("top_k_weights"),
           py::arg("out"), "submit() and sync() in one call, independent of this thread's submitted call if any.")
      .def("sync", &PyMoe::sync,
           "Wait for this thread's submitted call; an error raised in a worker is raised here. Ctrl-C cancels "
           "the call and raises KeyboardInterrupt within ~50 ms.")
      .def(
          "_fail_next_call", [](PyMoe& p) { p.layer().fail_next_call(); },
          "Test hook: the next call fails in a worker.")
      .def_property_readonly("isa", [](PyMoe& p) { return std::string(isa_name(p.layer().isa())); })
      .def_property_readonly("threads", [](PyMoe& p) { return p.layer().pool().threads(); })
      .def_property_readonly("numa_nodes", [](PyMoe& p) { return p.layer().pool().nodes(); })
      .def_property_readonly("cpus", [](PyMoe& p) { return p.layer().pool().layout().cpus; })
      .def_property_readonly("memory_nodes", [](PyMoe& p) { return p.layer().pool().layout().memory_node; })
      .def_property_readonly("unpinned_cpus", [](PyMoe& p) { return p.layer().pool().unpinned_cpus(); })
      .def_property_readonly("slices",
                             [](PyMoe& p) {
                               std::vector<std::pair<int64_t, int64_t>> s;
                               for (int n = 0; n < p.layer().pool().nodes(); ++n) s.push_back(p.layer().slice(n));
                               return s;
                             })
      .def_property_readonly("weight_bytes", [](PyMoe& p) { return p.layer().weight_bytes(); })
      .def_property_readonly("pending", &PyMoe::pending, "Whether the calling thread has a call in flight.");
  m.def(
      "pool_layout",
      [](int threads, int numa_nodes) {
        try {
          const PoolLayout l = choose_layout(threads, numa_nodes);
          return py::make_tuple(l.cpus, l.memory_node);
        } catch (const std::invalid_argument& e) {
          throw py::value_error(e.what());
        }
      },
      py::arg("threads") = 0, py::arg("numa_nodes") = 0,
      "(cpus per node group, memory node per group) that MoE(threads=, numa_nodes=) would use.");
  m.def(
      "pool_stats",
      [](int threads, int numa_nodes) {
        PoolLayout layout;
        try {
          layout = choose_layout(threads, numa_nodes);
        } catch (const std::invalid_argument& e) {
          throw py::value_error(e.what());
        }
        py::dict d;
        const std::shared_ptr<ThreadPool> pool = ThreadPool::find(layout);
        d["jobs"] = pool ? pool->jobs_done() : 0;
        d["busy_seconds"] = pool ? pool->busy_seconds() : 0.0;
        return d;
      },
      py::arg("threads") = 0, py::arg("numa_nodes") = 0,
      "{'jobs', 'busy_seconds'} of the pool with this layout so far (zeros when none exists): the time the "
      "CPU operators' kernels took, start to finish, over all calls.");
}

}  // namespace ktinject
