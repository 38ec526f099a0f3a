// A whole pre-norm MoE decoder layer at few tokens as two pool jobs around the caller's KV cache:
//
//   pre:   h = RMSNorm_in(x); q, k, v = attention's projections of h (q/k norm, rotary)   (AttentionLayer)
//   -- the caller appends k, v to its cache --
//   post:  x1 = x + o_proj(attention(q, K, V));  h2 = RMSNorm_post(x1)
//          weights, ids = router(h2);  out = x1 + experts(h2, ids, weights)           (RouterLayer, MoeLayer)
//
// transformers runs this layer as ~25 calls from Python and 4 pool jobs; here it is 2 pool jobs, so the
// time between the kernels (and the cold caches it runs on) mostly goes away. The parts are the layers the
// attention, router and experts operators already own; they must share one pool.
//
// Concurrency: calls are owned by their callers and run one at a time on the pool, as for every operator.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "attention/attention.h"
#include "moe/moe.h"
#include "moe/router.h"
#include "runtime/pool_call.h"
#include "runtime/thread_pool.h"

namespace ktinject {

class DecoderLayer;

// x [T, hidden] -> q, k, v as ProjectCall (cos/sin [T, rot]).
class LayerPreCall : public PoolCall {
 public:
  LayerPreCall(DecoderLayer& layer, const float* x, int64_t tokens, const float* cos, const float* sin, int64_t rot,
               float* q, float* k, float* v);
  void run(int node, int local) override;
  void finish_all();

  DecoderLayer& layer;
  const float* x;
  const int64_t tokens;
  std::vector<float> h;  // the normed input (before `project`, which reads it)
  ProjectCall project;
};

// q [B*T, heads*head_dim], the cache (as AttendCall), x [B*T, hidden] -> out [B*T, hidden].
class LayerPostCall : public PoolCall {
 public:
  LayerPostCall(DecoderLayer& layer, const float* q, int64_t batch, int64_t tokens, const KvView& keys,
                const KvView& values, int64_t n_keys, const MaskView& mask, const float* x, float* out);
  void run(int node, int local) override;
  void finish_all();

  DecoderLayer& layer;
  const float* x;
  const int64_t rows;
  float* out;
  // Scratch, declared before the calls that point into it.
  std::vector<float> ctx, attn_out, h2, logits, weights, moe_out;
  std::vector<int64_t> ids;
  AttendCall attend;
  RouterCall route;
  MoeCall experts;
};

class DecoderLayer {
 public:
  // The parts must outlive this layer and share one pool; widths are checked (std::invalid_argument).
  DecoderLayer(AttentionLayer& attention, RouterLayer& router, MoeLayer& experts, std::vector<float> input_norm,
               float input_eps, std::vector<float> post_norm, float post_eps);
  DecoderLayer(const DecoderLayer&) = delete;
  DecoderLayer& operator=(const DecoderLayer&) = delete;

  int64_t hidden() const { return attention_.spec().hidden; }
  const AttentionLayer& attention() const { return attention_; }
  const ThreadPool& pool() const { return *pool_; }
  const std::shared_ptr<ThreadPool>& shared_pool() const { return pool_; }
  void submit(LayerPreCall& call);
  void submit(LayerPostCall& call);

 private:
  friend class LayerPreCall;
  friend class LayerPostCall;
  AttentionLayer& attention_;
  RouterLayer& router_;
  MoeLayer& experts_;
  std::vector<float> input_norm_, post_norm_;
  float input_eps_, post_eps_;
  std::shared_ptr<ThreadPool> pool_;
  NodeBarrier barrier_;  // every worker of the pool, between phases
};

}  // namespace ktinject
