// Memory read bandwidth as the pool's pinned workers see it: the roofline the benchmarks compare the CPU
// operators against (a decode step of the experts is bound by reading their weights once).
#pragma once

#include <cstddef>

namespace ktinject {

// Best of `repeats` passes of `threads` pinned workers (0 = every CPU) each reading its share of a
// `bytes` buffer, in GB/s. Throws std::invalid_argument for an impossible thread count.
double measure_read_bandwidth(size_t bytes, int threads, int repeats);

}  // namespace ktinject
