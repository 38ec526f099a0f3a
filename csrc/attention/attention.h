// Attention on the CPU for few query tokens (decode), as two pool jobs around the caller's KV cache:
//
//   project:  q, k, v = x Wq^T, x Wk^T, x Wv^T       (three LinearLayers in one job: one pool hand-over)
//             per-head RMSNorm of q and k (optional), rotary embedding of q and k (rotate-half form,
//             cos/sin given per token, over the first `rot` dimensions of every head)
//   -- the caller appends k, v to its cache (transformers' Cache.update: the cache stays the caller's) --
//   attend:   ctx = softmax(scale q K^T + mask) V per query head (grouped-query: heads / kv_heads query
//             heads share a KV head), then out = ctx Wo^T in the same job
//
// A decode step of a layer is then two pool jobs and a cache update instead of a few dozen framework ops,
// which on a CPU cost more than the attention itself. The projections are LinearLayers owned by the caller
// (stored GGUF blocks or float rows, NUMA row slices); they must all run on this layer's pool.
//
// Concurrency: like every pool operator, calls are owned by their callers and run one at a time on the
// pool; the layer's own state (norm weights, barrier) is read-only or touched only inside jobs.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "attention/attention_kernels.h"
#include "linear/linear.h"
#include "runtime/pool_call.h"
#include "runtime/thread_pool.h"

namespace ktinject {

struct AttentionSpec {
  int64_t hidden = 0;  // model width: q/k/v input, o output
  int64_t heads = 0, kv_heads = 0, head_dim = 0;
  float scale = 0.0f;     // softmax scale (usually head_dim^-0.5)
  float norm_eps = 0.0f;  // of the per-head q/k RMSNorm, when there is one
};

class AttentionLayer;

// x [T, hidden] -> q [T, heads * head_dim], k and v [T, kv_heads * head_dim]; cos and sin [T, rot] (rot even,
// <= head_dim; 0: no rotary embedding). The caller keeps every buffer alive until finish() returns.
class ProjectCall : public PoolCall {
 public:
  ProjectCall(AttentionLayer& layer, const float* x, int64_t tokens, const float* cos, const float* sin, int64_t rot,
              float* q, float* k, float* v);
  void run(int node, int local) override;
  // Waits, then rethrows the first error of the call or of its projections.
  void finish_all();

  AttentionLayer& layer;
  const int64_t tokens, rot;
  const float *cos, *sin;
  float *q, *k;
  LinearCall q_call, k_call, v_call;
};

// Which keys each query sees (see KeyMask): with neither allow nor add, query t of a batch row sees keys
// [0, n_keys - tokens + t] (causal, the new tokens last). Otherwise the mask row of (b, t) is
// allow/add + b * stride_b + t * stride_t (n_keys elements), as transformers' 4-D masks with the head
// dimension dropped; stride_b may be 0 (one mask for every batch row).
struct MaskView {
  const uint8_t* allow = nullptr;
  const float* add = nullptr;
  int64_t stride_b = 0, stride_t = 0;
};

// Keys or values of the whole cache, [batch, kv_heads, n_keys, head_dim] with element strides (head_dim
// contiguous).
struct KvView {
  const void* data = nullptr;
  bool bf16 = false;
  int64_t stride_b = 0, stride_h = 0, stride_s = 0;
};

// q [batch * tokens, heads * head_dim] (from project) -> out [batch * tokens, hidden]; ctx is scratch of
// q's size.
class AttendCall : public PoolCall {
 public:
  AttendCall(AttentionLayer& layer, const float* q, int64_t batch, int64_t tokens, const KvView& keys,
             const KvView& values, int64_t n_keys, const MaskView& mask, float* ctx, float* out);
  void run(int node, int local) override;
  void finish_all();

  AttentionLayer& layer;
  const float* q;
  const int64_t batch, tokens, n_keys;
  const KvView keys, values;
  const MaskView mask;
  float* ctx;
  LinearCall o_call;
};

// Writes the new keys and values ([batch * tokens, kv_heads * head_dim] float32, token-major) into the cache
// buffers [batch, kv_heads, capacity, head_dim] at positions [n_past, n_past + tokens), converting to their dtype.
void append_kv(const AttentionSpec& spec, const KvView& keys, const KvView& values, const float* k, const float* v,
               int64_t batch, int64_t tokens, int64_t n_past);

// The body of a one-job decode step, for every worker: `first` (up to q, k, v), wait for all, the first
// worker appends k, v to the cache (`append`), wait for all, then `second` (attention onwards).
template <typename First, typename Second, typename Append>
void run_decode_step(PoolCall& step, First& first, Second& second, NodeBarrier& barrier, int node, int local,
                     Append append) {
  if (step.cancelled()) first.cancel();
  first.run(node, local);
  barrier.arrive_and_wait();
  if (node == 0 && local == 0 && !step.cancelled()) append();
  barrier.arrive_and_wait();
  if (step.cancelled()) second.cancel();
  second.run(node, local);
}

// project, the new k, v appended to the caller's buffers (append_kv), then attend over the first
// n_past + tokens keys and o_proj: a decode step's attention as one job. x [batch * tokens, hidden] float32
// -> out [batch * tokens, hidden]; keys/values are the whole writeable buffers (capacity checked by the caller).
class AttentionStepCall : public PoolCall {
 public:
  AttentionStepCall(AttentionLayer& layer, const float* x, int64_t batch, int64_t tokens, const float* cos,
                    const float* sin, int64_t rot, const KvView& keys, const KvView& values, int64_t n_past,
                    const MaskView& mask, float* out);
  void run(int node, int local) override;
  void finish_all();

  AttentionLayer& layer;
  const int64_t batch, tokens, n_past;
  const KvView keys, values;
  std::vector<float> q, k, v, ctx;  // scratch, before the calls that point into it
  ProjectCall project;
  AttendCall attend;
};

class AttentionLayer {
 public:
  // q/k/v/o must live as long as this layer and share one pool; shapes are checked against `spec`
  // (std::invalid_argument naming the projection). q_norm / k_norm: head_dim weights, or empty for none.
  AttentionLayer(const AttentionSpec& spec, LinearLayer& q, LinearLayer& k, LinearLayer& v, LinearLayer& o,
                 std::vector<float> q_norm, std::vector<float> k_norm);
  AttentionLayer(const AttentionLayer&) = delete;
  AttentionLayer& operator=(const AttentionLayer&) = delete;

  const AttentionSpec& spec() const { return spec_; }
  const ThreadPool& pool() const { return *pool_; }
  const std::shared_ptr<ThreadPool>& shared_pool() const { return pool_; }

  // Start a call and return (after the pool's job in flight); end it with call.finish_all(). Throw
  // std::invalid_argument when a projection's weights are not loaded.
  void submit(ProjectCall& call);
  void submit(AttendCall& call);
  void submit(AttentionStepCall& call);
  // What submit() checks, for layers that run these calls inside their own jobs.
  void submit_check() const;

 private:
  friend class ProjectCall;
  friend class AttendCall;
  friend class AttentionStepCall;
  int worker_index(int node, int local) const { return first_worker_[node] + local; }
  void norm_rope(const ProjectCall& call, int worker) const;
  void attend_rows(const AttendCall& call, int worker) const;

  AttentionSpec spec_;
  LinearLayer &q_, &k_, &v_, &o_;
  std::vector<float> q_norm_, k_norm_;
  std::shared_ptr<ThreadPool> pool_;
  Isa isa_;
  std::vector<int> first_worker_;  // per node group: global index of its first worker
  mutable NodeBarrier barrier_;    // all workers of the pool, between the phases of a job
};

}  // namespace ktinject
