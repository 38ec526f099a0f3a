// NUMA topology (which CPUs belong to which node) and pinning threads to CPUs. Node-local memory is
// runtime/node_buffer.h's.
// Built with libnuma when available (KTINJECT_HAVE_NUMA); otherwise the machine is treated as one node.
#pragma once

#include <vector>

namespace ktinject {

struct NumaTopology {
  // cpus[n] = the online CPU ids of node n; nodes without CPUs are left out.
  std::vector<std::vector<int>> cpus;
  std::vector<int> node_ids;  // the OS node id of each entry of `cpus`
};

bool built_with_numa();
const NumaTopology& numa_topology();

// Pins the calling thread to one CPU. Returns false (and leaves affinity alone) when that fails.
bool pin_current_thread(int cpu);

}  // namespace ktinject
