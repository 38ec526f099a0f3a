// A persistent pool of worker threads, each pinned to one CPU, grouped by NUMA node.
//
// Work is handed over as a Job: start() wakes every worker, each calls job.run(node, local) once, and
// wait(ticket) returns when all of them are done. Between jobs workers spin briefly (so back-to-back MoE
// layers start within a microsecond) and then sleep on a condition variable: an idle pool uses no CPU.
// Jobs run one at a time, in the order they were started, whichever threads start them: start() waits
// for the job in flight and hands the workers the next one as a single step under a lock.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace ktinject {

class Job {
 public:
  virtual ~Job() = default;
  // Called once per worker per start(). Must not throw (catch and record errors inside).
  virtual void run(int node, int local) = 0;
};

// Which CPUs serve which (possibly virtual) node, and where that node's memory lives.
struct PoolLayout {
  std::vector<std::vector<int>> cpus;  // cpus[n] = CPUs of node group n (one worker per CPU)
  std::vector<int> memory_node;        // OS NUMA node holding group n's memory (-1: no libnuma / unknown)
  std::string key() const;             // identity for the pool registry
};

// Picks CPUs for `threads` workers on `nodes` node groups from the machine's topology. 0 means "all".
// More groups than physical nodes splits nodes (how tests exercise the NUMA partitioning on one node).
// Throws std::invalid_argument on impossible requests (threads < nodes, more threads than CPUs...).
PoolLayout choose_layout(int threads, int nodes);

class ThreadPool {
 public:
  explicit ThreadPool(PoolLayout layout);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int nodes() const { return static_cast<int>(layout_.cpus.size()); }
  int threads_in(int node) const { return static_cast<int>(layout_.cpus[node].size()); }
  int threads() const { return static_cast<int>(workers_.size()); }
  const PoolLayout& layout() const { return layout_; }
  // CPUs whose pinning failed (the worker then runs unpinned).
  std::vector<int> unpinned_cpus() const;

  using Clock = std::chrono::steady_clock;

  // Runs `job` on every worker and returns its ticket at once. Any thread may call it: a job still in
  // flight is waited for first (jobs never overlap). `job` must stay alive until wait(ticket) returns.
  uint64_t start(Job* job);
  // Blocks until the job with `ticket` (and so every earlier one) has finished.
  void wait(uint64_t ticket);
  // As wait(), giving up at `deadline`; returns whether the job has finished.
  bool wait_until(uint64_t ticket, Clock::time_point deadline);
  bool finished(uint64_t ticket) const { return completed_.load(std::memory_order_acquire) >= ticket; }
  // Runs fn() in the calling thread while no job runs (after the job in flight; none starts until fn
  // returns): for changing state that jobs read.
  template <typename F>
  void exclusive(F&& fn) {
    std::lock_guard<std::mutex> handover(start_mu_);
    wait(generation_.load(std::memory_order_acquire));
    fn();
  }

  // Jobs run so far and the wall time they took (start() to the last worker done): the time spent in the
  // kernels, for telling it apart from everything else in a model step.
  uint64_t jobs_done() const { return jobs_done_.load(std::memory_order_relaxed); }
  double busy_seconds() const { return static_cast<double>(busy_ns_.load(std::memory_order_relaxed)) * 1e-9; }

  // Pools are shared by every operator with the same layout; the registry holds them weakly.
  static std::shared_ptr<ThreadPool> get(const PoolLayout& layout);
  // The pool with this layout if one exists (nullptr otherwise); never creates one.
  static std::shared_ptr<ThreadPool> find(const PoolLayout& layout);

 private:
  struct Worker {
    int node, local, cpu;
  };
  void worker_main(int index);

  PoolLayout layout_;
  std::vector<Worker> workers_;
  std::vector<int> all_cpus_;
  std::vector<std::thread> threads_;
  std::vector<char> pinned_;
  int spin_us_;

  Job* job_ = nullptr;
  std::mutex start_mu_;                  // one start() at a time: wait for the previous job + hand over
  std::atomic<uint64_t> generation_{0};  // ticket of the last job started
  std::atomic<uint64_t> completed_{0};   // ticket of the last job finished
  Clock::time_point job_started_;        // of the job in flight (written by start(), read by its last worker)
  std::atomic<uint64_t> jobs_done_{0};
  std::atomic<uint64_t> busy_ns_{0};
  std::atomic<int> remaining_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<int> started_{0};
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable work_cv_, done_cv_;
};

// Spin barrier for the workers of one node inside a job (short waits between phases).
class NodeBarrier {
 public:
  void reset(int parties) {
    parties_ = parties;
    count_.store(0);
    phase_.store(0);
  }
  void arrive_and_wait();

 private:
  int parties_ = 1;
  alignas(64) std::atomic<int> count_{0};
  alignas(64) std::atomic<int> phase_{0};
};

}  // namespace ktinject
