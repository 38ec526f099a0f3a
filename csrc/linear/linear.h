// A linear layer on the CPU: out[T, rows] = x[T, cols] . W^T (+ bias), W in GGUF blocks or float rows,
// on the same packed tiles, kernels and pinned pool as the MoE layer (moe.h).
//
// NUMA: every node group owns a slice of the output rows (whole 16-row tiles) in its own memory and
// writes those output columns; nodes never combine partial sums, so the weights exist once.
//
// A call runs on every worker: each node quantizes x for the weight type into its own buffer, then the
// node's workers take tasks = (a range of tiles) x (all tokens, in sub-batches of kLinearSubBatch). Tile
// ranges are sized so that a range's weights stay in L2 while every token sub-batch streams over them.
//
// Concurrency: a call is a LinearCall (runtime/pool_call.h) owned by its caller; any number may be in
// flight from any threads, and the pool runs them one at a time. Scratch is touched only inside jobs.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "quant/kernels.h"
#include "runtime/node_buffer.h"
#include "runtime/pool_call.h"
#include "runtime/thread_pool.h"

namespace ktinject {

struct LinearSpec {
  int64_t rows = 0;  // output features
  int64_t cols = 0;  // input features
  WeightType type = WeightType::F32;
  bool has_bias = false;
};

class LinearLayer;

// One call: out[T, rows] = x[T, cols] . W^T (+ bias). The caller keeps both buffers alive and unchanged
// until finish() returns.
class LinearCall : public PoolCall {
 public:
  LinearCall(LinearLayer& layer, const float* x, int64_t tokens, float* out);
  void run(int node, int local) override;

  LinearLayer& layer;
  const float* x;
  const int64_t tokens;
  float* out;
};

class LinearLayer {
 public:
  // Throws std::invalid_argument naming the bad field.
  LinearLayer(const LinearSpec& spec, std::shared_ptr<ThreadPool> pool, Isa isa);
  LinearLayer(const LinearLayer&) = delete;
  LinearLayer& operator=(const LinearLayer&) = delete;

  const LinearSpec& spec() const { return spec_; }
  Isa isa() const { return isa_; }
  const ThreadPool& pool() const { return *pool_; }
  const std::shared_ptr<ThreadPool>& shared_pool() const { return pool_; }
  // Output rows [r0, r1) held by node group n.
  std::pair<int64_t, int64_t> slice(int node) const;
  size_t weight_bytes() const;
  bool all_loaded() const;

  // Packs rows [first, first + n) (GGUF layout: n rows of row_bytes(type, cols) bytes) on the pool,
  // blocking. `first` must be a multiple of 16 and `n` too unless the range ends at `rows`.
  void load(int64_t first, int64_t n, const uint8_t* rows_data);
  // bias [rows], float32.
  void load_bias(const float* bias);

  // Starts `call` and returns at once (after the pool's job in flight, if any). Throws
  // std::invalid_argument when the weights are not all loaded. End it with call.finish().
  void submit(LinearCall& call);
  // Throws std::invalid_argument unless the weights (and the bias, if any) are loaded: what submit() checks.
  void check_ready() const;
  // Runs worker (node, local)'s share of `call` inside another job (an operator that chains layers in one
  // pool job, e.g. attention's q/k/v projections). Every worker of the pool must call it, in the same order
  // for every layer it chains; `call` is never started itself, its errors are recorded in it.
  void run_part(LinearCall& call, int node, int local) { run_call(call, node, local); }

 private:
  friend class LinearCall;
  struct Node {
    int64_t r0 = 0, r1 = 0;  // output rows of this node
    NodeBuffer weights;      // packed tiles of rows [r0, r1)
    NodeBuffer xq;           // the running call's quantized activations
    int64_t tiles_per_task = 1, n_tasks = 0;
    alignas(64) std::atomic<int64_t> next{0};
    NodeBarrier barrier;
    int64_t rows() const { return r1 - r0; }
  };
  class LoadJob;

  void run_call(LinearCall& call, int node, int local);
  void run_task(const LinearCall& call, Node& nd, int64_t task);

  LinearSpec spec_;
  std::shared_ptr<ThreadPool> pool_;
  Isa isa_;
  size_t act_bytes_ = 0;  // one quantized activation row
  std::vector<std::unique_ptr<Node>> nodes_;
  std::vector<float> bias_;
  std::atomic<bool> bias_loaded_{false};
  mutable std::mutex loaded_mu_;
  std::vector<char> loaded_tiles_;  // per 16-row tile of the whole matrix
};

}  // namespace ktinject
