// The router of a MoE layer on the CPU: logits = x Wg^T (a LinearLayer on the pool), then per token one of
//
//   softmax (Qwen3-MoE form):  p = softmax(logits); the top_k largest p (descending; ties to the lower
//                              expert id), renormalized to sum to one when `normalize`;
//   sigmoid (DeepSeek-V3 form): s = sigmoid(logits); choice = s + bias; the experts form `groups` equal
//                              groups ranked by the sum of their two largest choices, and the top_k largest
//                              choices of the best topk_groups groups are taken; weight = s (over its sum
//                              + 1e-20 when `normalize`) * scale.
//
// A token with a non-finite logit gets NaN weights (never a silently wrong choice). One pool job: the gate's
// rows are split over the workers, then the tokens.
#pragma once

#include <cstdint>
#include <vector>

#include "linear/linear.h"
#include "runtime/pool_call.h"
#include "runtime/thread_pool.h"

namespace ktinject {

class RouterLayer;

// How the router turns a token's logits into experts and weights (see above).
struct RouterSelect {
  enum class Score { kSoftmax, kSigmoid };
  Score score = Score::kSoftmax;
  bool normalize = false;
  int64_t groups = 1, topk_groups = 1;  // sigmoid only
  float scale = 1.0f;                   // sigmoid only (routed_scaling_factor)
  std::vector<float> bias;              // sigmoid only: [experts], or empty for none
};

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
  // gate: [experts, hidden], must outlive this layer. Throws std::invalid_argument naming a bad top_k or
  // selection field.
  RouterLayer(LinearLayer& gate, int64_t top_k, RouterSelect select);
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
  void select_softmax(const float* logit, float* weights, int64_t* ids) const;
  void select_sigmoid(const float* logit, float* weights, int64_t* ids) const;

  LinearLayer& gate_;
  int64_t top_k_;
  RouterSelect select_;
  std::shared_ptr<ThreadPool> pool_;
  std::vector<int> first_worker_;
  mutable NodeBarrier barrier_;
};

}  // namespace ktinject
