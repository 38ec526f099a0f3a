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

#include "bind_moe.h"
#include "moe/moe.h"
#include "quant/kernels.h"
#include "runtime/node_buffer.h"
#include "runtime/thread_pool.h"

namespace py = pybind11;

namespace ktinject {

using bind::PyMoe;

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
