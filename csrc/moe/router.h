// The softmax top-k router of a MoE layer on the CPU: logits = x Wg^T (a LinearLayer on the pool), then per
// token probabilities = softmax(logits), the top_k largest (descending; ties to the lower expert id), and,
// when `normalize`, those renormalized to sum to one. One pool job: the gate's rows are split over the
// workers, then the tokens.
#pragma once

#include <cstdint>

#include "linear/linear.h"
#include "runtime/pool_call.h"
#include "runtime/thread_pool.h"

namespace ktinject {

class RouterLayer;

// x [T, hidden] -> logits [T, experts], weights [T, top_k] (float32), ids [T, top_k]. Buffers stay alive
// until finish_all() returns.
class RouterCall : public PoolCall {
 public:
  RouterCall(RouterLayer& layer, const float* x, int64_t tokens, float* logits, float* weights, int64_t* ids);
  void run(int node, int local) override;
  void finish_all();

  RouterLayer& layer;
  const int64_t tokens;
  float* logits;
  float* weights;
  int64_t* ids;
  LinearCall gate_call;
};

class RouterLayer {
 public:
  // gate: [experts, hidden], must outlive this layer. Throws std::invalid_argument on a bad top_k.
  RouterLayer(LinearLayer& gate, int64_t top_k, bool normalize);
  RouterLayer(const RouterLayer&) = delete;
  RouterLayer& operator=(const RouterLayer&) = delete;

  int64_t experts() const { return gate_.spec().rows; }
  int64_t hidden() const { return gate_.spec().cols; }
  int64_t top_k() const { return top_k_; }
  const ThreadPool& pool() const { return *pool_; }
  const std::shared_ptr<ThreadPool>& shared_pool() const { return pool_; }
  void submit(RouterCall& call);
  void check_ready() const { gate_.check_ready(); }

 private:
  friend class RouterCall;
  void select(const RouterCall& call, int64_t token) const;

  LinearLayer& gate_;
  int64_t top_k_;
  bool normalize_;
  std::shared_ptr<ThreadPool> pool_;
  std::vector<int> first_worker_;
  mutable NodeBarrier barrier_;
};

}  // namespace ktinject
