#include "numa_topology.h"

#include <pthread.h>
#include <sched.h>

#include <fstream>
#include <sstream>
#include <string>

namespace ktinject {
namespace {

// Parses a Linux cpulist such as "0-3,8,10-11".
std::vector<int> parse_cpulist(const std::string& text) {
  std::vector<int> cpus;
  std::stringstream ss(text);
  std::string part;
  while (std::getline(ss, part, ',')) {
    if (part.empty() || part == "\n") continue;
    const auto dash = part.find('-');
    try {
      if (dash == std::string::npos) {
        cpus.push_back(std::stoi(part));
      } else {
        const int lo = std::stoi(part.substr(0, dash));
        const int hi = std::stoi(part.substr(dash + 1));
        for (int c = lo; c <= hi; ++c) cpus.push_back(c);
      }
    } catch (...) {
      // a malformed entry is skipped rather than failing the whole topology
    }
  }
  return cpus;
}

std::vector<int> allowed_cpus() {
  std::vector<int> out;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return out;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &set)) out.push_back(c);
  return out;
}

NumaTopology detect() {
  NumaTopology topo;
  const std::vector<int> allowed = allowed_cpus();
  auto is_allowed = [&](int c) {
    for (int a : allowed)
      if (a == c) return true;
    return allowed.empty();
  };
  for (int node = 0; node < 1024; ++node) {
    std::ifstream f("/sys/devices/system/node/node" + std::to_string(node) + "/cpulist");
    if (!f) {
      if (node > 64) break;
      continue;
    }
    std::string line;
    std::getline(f, line);
    std::vector<int> cpus;
    for (int c : parse_cpulist(line))
      if (is_allowed(c)) cpus.push_back(c);
    if (!cpus.empty()) {
      topo.cpus.push_back(cpus);
      topo.node_ids.push_back(node);
    }
  }
  if (topo.cpus.empty()) {  // no sysfs node info (containers, non-Linux): one node with every allowed CPU
    topo.cpus.push_back(allowed);
    topo.node_ids.push_back(0);
  }
  return topo;
}

}  // namespace

bool built_with_numa() {
#ifdef KTINJECT_HAVE_NUMA
  return true;
#else
  return false;
#endif
}

const NumaTopology& numa_topology() {
  static const NumaTopology topo = detect();
  return topo;
}

bool pin_current_thread(int cpu) {
  if (cpu < 0 || cpu >= CPU_SETSIZE) return false;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(pthread_self(), sizeof(set), &set) == 0;
}

}  // namespace ktinject
