// One asynchronous call of an operator on the thread pool: the Job the workers run, plus what its caller
// waits on (the pool ticket), what a worker reports (the first error) and how it is interrupted (cancel).
//
// Each call owns what differs between calls (inputs, outputs, error), so any number of calls of one
// operator may be in flight from any threads: the pool runs their jobs one at a time, in the order they
// were started, and state that the operator reuses between calls is touched only inside its jobs.
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>

#include "runtime/thread_pool.h"

namespace ktinject {

// An operator used out of order: submit() twice from one thread without sync(), or sync() with nothing
// submitted.
class CallOrderError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

class PoolCall : public Job {
 public:
  using Clock = ThreadPool::Clock;

  explicit PoolCall(std::shared_ptr<ThreadPool> pool) : pool_(std::move(pool)) {}
  // A call still running is waited for: its workers must never see it freed.
  ~PoolCall() override {
    if (ticket_ != 0) pool_->wait(ticket_);
  }
  PoolCall(const PoolCall&) = delete;
  PoolCall& operator=(const PoolCall&) = delete;

  // Hands the job to the pool (after the job in flight, if any) and returns.
  void start() { ticket_ = pool_->start(this); }
  // True once the job has finished (also when it was never started).
  bool wait_until(Clock::time_point deadline) const { return ticket_ == 0 || pool_->wait_until(ticket_, deadline); }
  // Waits for the job and rethrows the first error a worker recorded.
  void finish() {
    if (ticket_ != 0) pool_->wait(ticket_);
    std::lock_guard<std::mutex> lock(error_mu_);
    if (error_) std::rethrow_exception(error_);
  }

  // Workers skip the rest of a cancelled call (its output is then garbage; finish() still ends it).
  void cancel() { cancel_.store(true, std::memory_order_relaxed); }
  bool cancelled() const { return cancel_.load(std::memory_order_relaxed); }
  // Called by workers (which must not throw): the first error wins.
  void record_error(std::exception_ptr e) {
    std::lock_guard<std::mutex> lock(error_mu_);
    if (!error_) error_ = e;
  }

  ThreadPool& pool() const { return *pool_; }

 private:
  std::shared_ptr<ThreadPool> pool_;
  uint64_t ticket_ = 0;
  std::atomic<bool> cancel_{false};
  std::mutex error_mu_;
  std::exception_ptr error_;
};

}  // namespace ktinject
