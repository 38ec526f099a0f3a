#include "runtime/thread_pool.h"

#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <map>
#include <stdexcept>

#include "numa_topology.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define KTINJECT_PAUSE() _mm_pause()
#else
#define KTINJECT_PAUSE() ((void)0)
#endif

namespace ktinject {
namespace {

// How long idle workers spin before sleeping. Long enough to cover the gap between two MoE layers'
// calls in a decode step, short enough that an idle pool costs nothing. KTINJECT_SPIN_US overrides.
int spin_microseconds() {
  const char* env = std::getenv("KTINJECT_SPIN_US");
  if (env != nullptr && *env != '\0') {
    const int v = std::atoi(env);
    return v < 0 ? 0 : v;
  }
  return 100;
}

}  // namespace

std::string PoolLayout::key() const {
  std::string k;
  for (size_t n = 0; n < cpus.size(); ++n) {
    k += "[" + std::to_string(memory_node[n]) + ":";
    for (int c : cpus[n]) k += std::to_string(c) + ",";
    k += "]";
  }
  return k;
}

PoolLayout choose_layout(int threads, int nodes) {
  const NumaTopology& topo = numa_topology();
  const int physical = static_cast<int>(topo.cpus.size());
  std::vector<int> all_cpus, cpu_node;
  for (int n = 0; n < physical; ++n)
    for (int c : topo.cpus[n]) {
      all_cpus.push_back(c);
      cpu_node.push_back(topo.node_ids[n]);
    }
  const int available = static_cast<int>(all_cpus.size());
  if (threads < 0) throw std::invalid_argument("threads must be >= 0 (0 = every CPU), got " + std::to_string(threads));
  if (nodes < 0) throw std::invalid_argument("numa_nodes must be >= 0 (0 = every node), got " + std::to_string(nodes));
  const int n_groups = nodes == 0 ? physical : nodes;
  PoolLayout layout;
  const bool numa = built_with_numa();
  if (n_groups <= physical) {
    int node_cpus = 0;
    for (int n = 0; n < n_groups; ++n) node_cpus += static_cast<int>(topo.cpus[n].size());
    const int t = threads == 0 ? node_cpus : threads;
    if (t < n_groups)
      throw std::invalid_argument("threads=" + std::to_string(t) + " is fewer than numa_nodes=" +
                                  std::to_string(n_groups) + " (every node needs a worker)");
    for (int n = 0; n < n_groups; ++n) {
      const int want = t / n_groups + (n < t % n_groups ? 1 : 0);
      if (want > static_cast<int>(topo.cpus[n].size()))
        throw std::invalid_argument("threads=" + std::to_string(t) + " over " + std::to_string(n_groups) +
                                    " node(s) needs " + std::to_string(want) + " CPUs on node " +
                                    std::to_string(topo.node_ids[n]) + ", which has " +
                                    std::to_string(topo.cpus[n].size()));
      layout.cpus.emplace_back(topo.cpus[n].begin(), topo.cpus[n].begin() + want);
      layout.memory_node.push_back(numa ? topo.node_ids[n] : -1);
    }
    return layout;
  }
  // More groups than physical nodes: split the CPUs (tests use this to exercise the partitioning).
  const int t = threads == 0 ? available : threads;
  if (t > available)
    throw std::invalid_argument("threads=" + std::to_string(t) + " exceeds the " + std::to_string(available) +
                                " CPUs this process may run on");
  if (t < n_groups)
    throw std::invalid_argument("threads=" + std::to_string(t) + " is fewer than numa_nodes=" +
                                std::to_string(n_groups) + " (every node needs a worker)");
  int next = 0;
  for (int n = 0; n < n_groups; ++n) {
    const int want = t / n_groups + (n < t % n_groups ? 1 : 0);
    layout.cpus.emplace_back(all_cpus.begin() + next, all_cpus.begin() + next + want);
    layout.memory_node.push_back(numa ? cpu_node[next] : -1);
    next += want;
  }
  return layout;
}

ThreadPool::ThreadPool(PoolLayout layout) : layout_(std::move(layout)), spin_us_(spin_microseconds()) {
  for (int n = 0; n < nodes(); ++n)
    for (int l = 0; l < threads_in(n); ++l) {
      workers_.push_back({n, l, layout_.cpus[n][l]});
      all_cpus_.push_back(layout_.cpus[n][l]);
    }
  pinned_.assign(workers_.size(), 0);
  threads_.reserve(workers_.size());
  for (size_t i = 0; i < workers_.size(); ++i)
    threads_.emplace_back(&ThreadPool::worker_main, this, static_cast<int>(i));
  // Wait until every worker has pinned itself, so unpinned_cpus() is meaningful and the first job
  // does not pay thread start-up.
  while (started_.load(std::memory_order_acquire) < static_cast<int>(workers_.size())) std::this_thread::yield();
}

ThreadPool::~ThreadPool() {
  wait(generation_.load());
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
  }
  work_cv_.notify_all();
  for (auto& t : threads_) t.join();
}

std::vector<int> ThreadPool::unpinned_cpus() const {
  std::vector<int> out;
  for (size_t i = 0; i < workers_.size(); ++i)
    if (!pinned_[i]) out.push_back(workers_[i].cpu);
  return out;
}

uint64_t ThreadPool::start(Job* job) {
  std::lock_guard<std::mutex> handover(start_mu_);
  wait(generation_.load(std::memory_order_acquire));  // the job in flight, if any
  job_ = job;
  job_started_ = Clock::now();
  remaining_.store(static_cast<int>(workers_.size()), std::memory_order_seq_cst);
  const uint64_t ticket = generation_.fetch_add(1, std::memory_order_seq_cst) + 1;
  if (sleeping_.load(std::memory_order_seq_cst) > 0) {
    {
      std::lock_guard<std::mutex> lock(mu_);
    }  // a sleeper checks its predicate under this lock
    work_cv_.notify_all();
  }
  return ticket;
}

void ThreadPool::wait(uint64_t ticket) { wait_until(ticket, Clock::time_point::max()); }

bool ThreadPool::wait_until(uint64_t ticket, Clock::time_point deadline) {
  if (finished(ticket)) return true;
  // A caller running on one of the workers' CPUs yields until the job is done: the worker there gets the
  // core back at once (it never yields while working; the scheduler hands the caller the core about once
  // per tick and the caller gives it straight back), and when the job ends the caller is already runnable.
  // Blocking on the condition variable instead cost a futex wake-up and a context switch per call:
  // 32 -> 6.5 us per call of an empty layer at threads=2 on 2 cores, Q4_K decode -4% per layer.
  // A caller with a CPU of its own polls for a while (short jobs end without a futex wake-up).
  const int cpu = sched_getcpu();
  const bool shares_a_core = cpu < 0 || std::find(all_cpus_.begin(), all_cpus_.end(), cpu) != all_cpus_.end();
  if (shares_a_core) {
    // The deadline is checked after every yield: on a busy machine one yield can last a time slice.
    while (!finished(ticket)) {
      std::this_thread::yield();
      if (deadline != Clock::time_point::max() && Clock::now() >= deadline) return finished(ticket);
    }
    return true;
  }
  const auto spin_until = std::min(deadline, Clock::now() + std::chrono::microseconds(spin_us_));
  for (int i = 0;; ++i) {
    if (finished(ticket)) return true;
    KTINJECT_PAUSE();
    if ((i & 63) == 63 && Clock::now() >= spin_until) break;
  }
  std::unique_lock<std::mutex> lock(mu_);
  return done_cv_.wait_until(lock, deadline, [&] { return finished(ticket); });
}

void ThreadPool::worker_main(int index) {
  const Worker w = workers_[index];
  pinned_[index] = pin_current_thread(w.cpu) ? 1 : 0;
  started_.fetch_add(1, std::memory_order_release);
  uint64_t seen = 0;
  using clock = std::chrono::steady_clock;
  while (true) {
    bool ready = false;
    const auto spin_until = clock::now() + std::chrono::microseconds(spin_us_);
    for (int i = 0;; ++i) {
      if (generation_.load(std::memory_order_acquire) != seen || stop_.load(std::memory_order_relaxed)) {
        ready = true;
        break;
      }
      KTINJECT_PAUSE();
      if ((i & 3) == 3) {
        if (clock::now() >= spin_until) break;
        // Let the thread that will submit the next job run if it shares this core (it usually does: the
        // pool has a worker on every CPU). Without a competitor this returns at once.
        std::this_thread::yield();
      }
    }
    if (!ready) {
      std::unique_lock<std::mutex> lock(mu_);
      sleeping_.fetch_add(1, std::memory_order_seq_cst);
      work_cv_.wait(lock, [&] { return generation_.load(std::memory_order_seq_cst) != seen || stop_.load(); });
      sleeping_.fetch_sub(1, std::memory_order_seq_cst);
    }
    if (stop_.load()) return;
    seen = generation_.load(std::memory_order_acquire);
    job_->run(w.node, w.local);
    if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      // Jobs never overlap, so the last worker out finishes job `seen`.
      const auto took = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - job_started_).count();
      busy_ns_.fetch_add(static_cast<uint64_t>(took), std::memory_order_relaxed);
      jobs_done_.fetch_add(1, std::memory_order_relaxed);
      completed_.store(seen, std::memory_order_release);
      {
        std::lock_guard<std::mutex> lock(mu_);
      }
      done_cv_.notify_all();
    }
  }
}

namespace {
std::mutex& registry_mutex() {
  static std::mutex mu;
  return mu;
}
std::map<std::string, std::weak_ptr<ThreadPool>>& registry() {
  static std::map<std::string, std::weak_ptr<ThreadPool>> pools;
  return pools;
}
}  // namespace

std::shared_ptr<ThreadPool> ThreadPool::get(const PoolLayout& layout) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto& slot = registry()[layout.key()];
  std::shared_ptr<ThreadPool> pool = slot.lock();
  if (!pool) {
    pool = std::make_shared<ThreadPool>(layout);
    slot = pool;
  }
  return pool;
}

std::shared_ptr<ThreadPool> ThreadPool::find(const PoolLayout& layout) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto it = registry().find(layout.key());
  return it == registry().end() ? nullptr : it->second.lock();
}

void NodeBarrier::arrive_and_wait() {
  if (parties_ <= 1) return;
  const int phase = phase_.load(std::memory_order_acquire);
  if (count_.fetch_add(1, std::memory_order_acq_rel) == parties_ - 1) {
    count_.store(0, std::memory_order_relaxed);
    phase_.store(phase + 1, std::memory_order_release);
    return;
  }
  for (int i = 0; phase_.load(std::memory_order_acquire) == phase; ++i) {
    KTINJECT_PAUSE();
    if ((i & 63) == 63) std::this_thread::yield();  // let a straggler (or the caller) run on this core
  }
}

}  // namespace ktinject
