// A whole pre-norm decoder layer at few tokens as two pool jobs around the caller's KV cache:
//
//   pre:   h = RMSNorm_in(x); q, k, v = attention's projections of h (q/k norm, rotary)   (AttentionLayer)
//   -- the caller appends k, v to its cache --
//   post:  x1 = x + o_proj(attention(q, K, V));  h2 = RMSNorm_post(x1)
//          out = x1 + ffn(h2), ffn = one or both of
//            routed experts:  weights, ids = router(h2); experts(h2, ids, weights)   (RouterLayer, MoeLayer)
//            a gated MLP:     down(silu(gate(h2)) * up(h2))   (LinearLayers: the MoE block's shared experts,
//                                                              or a dense layer's MLP), optionally scaled by
//                                                              sigmoid(shared_gate(h2)) (Qwen2-MoE's shared expert)
//
// transformers runs this layer as ~25 calls from Python and 4 pool jobs; here it is 2 pool jobs, so the
// time between the kernels (and the cold caches it runs on) mostly goes away. When the caller's cache is a
// buffer with room for the new tokens, `step` is all of it in one job: pre, the new k, v written into the
// buffer, then post (no Python between the halves at all). The parts are the layers the
// attention, router and experts operators already own; they must share one pool.
//
// Concurrency: calls are owned by their callers and run one at a time on the pool, as for every operator.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "attention/attention.h"
#include "linear/linear.h"
#include "moe/moe.h"
#include "moe/router.h"
#include "runtime/pool_call.h"
#include "runtime/thread_pool.h"

namespace ktinject {

class DecoderLayer;

// The residual stream and the new keys/values in the model's dtype: float32, or bfloat16 bits (converted
// inside the jobs, so a bfloat16 model pays no conversions in Python).
struct StreamIn {
  const void* data = nullptr;
  bool bf16 = false;
};
struct StreamOut {
  void* data = nullptr;
  bool bf16 = false;
};

// x [T, hidden] -> q, k, v as ProjectCall (cos/sin [T, rot]).
class LayerPreCall : public PoolCall {
 public:
  LayerPreCall(DecoderLayer& layer, StreamIn x, int64_t tokens, const float* cos, const float* sin, int64_t rot,
               float* q, StreamOut k, StreamOut v);
  void run(int node, int local) override;
  void finish_all();

  DecoderLayer& layer;
  const StreamIn x;
  const int64_t tokens;
  const StreamOut k_out, v_out;
  // Scratch before `project`, which points into it: the normed input, and float32 k/v for bfloat16 outputs.
  std::vector<float> h, k32, v32;
  ProjectCall project;
};

// q [B*T, heads*head_dim], the cache (as AttendCall), x [B*T, hidden] -> out [B*T, hidden].
class LayerPostCall : public PoolCall {
 public:
  LayerPostCall(DecoderLayer& layer, const float* q, int64_t batch, int64_t tokens, const KvView& keys,
                const KvView& values, int64_t n_keys, const MaskView& mask, StreamIn x, StreamOut out);
  void run(int node, int local) override;
  void finish_all();

  DecoderLayer& layer;
  const StreamIn x;
  const int64_t rows;
  const StreamOut out;
  // Scratch, declared before the calls that point into it (x1: the stream after attention; g, u, a: the
  // MLP's gate, up and activated rows).
  std::vector<float> ctx, attn_out, x1, h2, logits, weights, moe_out, g, u, a, mlp_out, mlp_scale;
  std::vector<int64_t> ids;
  AttendCall attend;
  std::optional<RouterCall> route;  // with routed experts
  std::optional<MoeCall> experts;
  std::optional<LinearCall> gate_call, up_call, down_call;  // with an MLP
  std::optional<LinearCall> shared_gate_call;               // with the MLP's sigmoid gate

 private:
  void activate(int worker);
};

// pre, then the new keys/values written into the caller's buffers at positions [n_past, n_past + tokens),
// then post over the first n_past + tokens keys: one pool job. keys/values are the whole buffers
// [batch, kv_heads, capacity, head_dim] (writeable; capacity >= n_past + tokens, checked by the caller).
class LayerStepCall : public PoolCall {
 public:
  LayerStepCall(DecoderLayer& layer, StreamIn x, int64_t batch, int64_t tokens, const float* cos, const float* sin,
                int64_t rot, const KvView& keys, const KvView& values, int64_t n_past, const MaskView& mask,
                StreamOut out);
  void run(int node, int local) override;
  void finish_all();

  DecoderLayer& layer;
  const int64_t batch, tokens, n_past;
  const KvView keys, values;
  // Scratch before the calls that point into it: q, and the new k, v in float32 ([batch * tokens, width]).
  std::vector<float> q, k, v;
  LayerPreCall pre;
  LayerPostCall post;
};

// The gated MLP's projections (all three, or none): gate, up [inter, hidden]; down [hidden, inter]; and
// optionally shared_gate [1, hidden], whose sigmoid scales the MLP's output per token.
struct MlpLayers {
  LinearLayer* gate = nullptr;
  LinearLayer* up = nullptr;
  LinearLayer* down = nullptr;
  LinearLayer* shared_gate = nullptr;
  bool present() const { return gate != nullptr; }
};

class DecoderLayer {
 public:
  // The parts must outlive this layer and share one pool; router and experts come together or not at all,
  // and at least one of them or the MLP is given; widths are checked (std::invalid_argument).
  DecoderLayer(AttentionLayer& attention, RouterLayer* router, MoeLayer* experts, MlpLayers mlp,
               std::vector<float> input_norm, float input_eps, std::vector<float> post_norm, float post_eps);
  DecoderLayer(const DecoderLayer&) = delete;
  DecoderLayer& operator=(const DecoderLayer&) = delete;

  int64_t hidden() const { return attention_.spec().hidden; }
  int64_t kv_width() const { return attention_.spec().kv_heads * attention_.spec().head_dim; }
  int64_t mlp_width() const { return mlp_.present() ? mlp_.gate->spec().rows : 0; }
  const AttentionLayer& attention() const { return attention_; }
  const ThreadPool& pool() const { return *pool_; }
  const std::shared_ptr<ThreadPool>& shared_pool() const { return pool_; }
  void submit(LayerPreCall& call);
  void submit(LayerPostCall& call);
  void submit(LayerStepCall& call);

 private:
  friend class LayerPreCall;
  friend class LayerPostCall;
  friend class LayerStepCall;
  void check_ready() const;
  AttentionLayer& attention_;
  RouterLayer* router_;  // with experts_, or both null
  MoeLayer* experts_;
  MlpLayers mlp_;
  std::vector<int> first_worker_;  // per node group: global index of its first worker
  std::vector<float> input_norm_, post_norm_;
  float input_eps_, post_eps_;
  std::shared_ptr<ThreadPool> pool_;
  NodeBarrier barrier_;  // every worker of the pool, between phases
};

}  // namespace ktinject
