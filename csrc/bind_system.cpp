// Python bindings for machine facts: ISA features and NUMA topology (used by `ktinject doctor`), and the
// memory read bandwidth the benchmarks measure against.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstddef>

#include "cpu_features.h"
#include "numa_topology.h"
#include "runtime/bandwidth.h"

namespace py = pybind11;

namespace ktinject {

void bind_system(py::module_& m) {
  m.def(
      "cpu_features",
      []() {
        const CpuFeatures& f = cpu_features();
        py::dict d;
        d["avx2"] = f.avx2;
        d["fma"] = f.fma;
        d["f16c"] = f.f16c;
        d["avx512f"] = f.avx512f;
        d["avx512bw"] = f.avx512bw;
        d["avx512vl"] = f.avx512vl;
        d["avx512dq"] = f.avx512dq;
        d["avx512_vnni"] = f.avx512_vnni;
        d["avx512_bf16"] = f.avx512_bf16;
        d["avx_vnni"] = f.avx_vnni;
        d["amx_tile"] = f.amx_tile;
        d["amx_int8"] = f.amx_int8;
        d["amx_bf16"] = f.amx_bf16;
        return d;
      },
      "ISA features detected from CPUID and enabled by the OS (XGETBV).");
  m.def(
      "numa_topology",
      []() {
        const NumaTopology& t = numa_topology();
        py::list nodes;
        for (size_t i = 0; i < t.cpus.size(); ++i) {
          py::dict n;
          n["node"] = t.node_ids[i];
          n["cpus"] = t.cpus[i];
          nodes.append(n);
        }
        return nodes;
      },
      "NUMA nodes that have CPUs this process may run on: [{'node': id, 'cpus': [...]}, ...].");
  m.attr("built_with_numa") = built_with_numa();
  m.def(
      "measure_read_bandwidth",
      [](size_t bytes, int threads, int repeats) {
        py::gil_scoped_release release;
        return measure_read_bandwidth(bytes, threads, repeats);
      },
      py::arg("bytes") = size_t{1} << 30, py::arg("threads") = 0, py::arg("repeats") = 5,
      "Best read bandwidth (GB/s) of `threads` pinned workers streaming `bytes` of memory (a benchmark).");
}

}  // namespace ktinject
