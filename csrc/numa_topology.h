// NUMA topology (which CPUs belong to which node) and node-local allocation.
// Built with libnuma when available (KTINJECT_HAVE_NUMA); otherwise the machine is treated as one node.
#pragma once

#include <cstddef>
#include <vector>

namespace ktinject {

struct NumaTopology {
  // cpus[n] = the online CPU ids of node n; nodes without CPUs are left out.
  std::vector<std::vector<int>> cpus;
  std::vector<int> node_ids;  // the OS node id of each entry of `cpus`
};

bool built_with_numa();
const NumaTopology& numa_topology();

// Allocates `bytes` on OS node `node` (64-byte aligned, zeroed pages untouched); falls back to the
// calling thread's policy when NUMA support is absent or node < 0. Free with numa_free_bytes.
void* numa_alloc_bytes(size_t bytes, int node);
void numa_free_bytes(void* ptr, size_t bytes);

// Pins the calling thread to one CPU. Returns false (and leaves affinity alone) when that fails.
bool pin_current_thread(int cpu);

}  // namespace ktinject
