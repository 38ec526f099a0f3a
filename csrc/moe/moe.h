// One MoE layer's routed experts on the CPU: out[t] = sum_k w[t,k] * down_e(act(gate_e(x[t]), up_e(x[t])))
// with e = ids[t,k], on packed GGUF weights, run by a shared pinned thread pool.
//
// NUMA: every node group of the pool owns a slice [i0, i1) of every expert's intermediate dimension
// (gate/up rows and down columns) in its own memory, computes a partial output from it, and the
// partials are summed: the weights exist once in total, not once per node.
//
// A call runs in three phases per node, separated by that node's barrier:
//   0. quantize x for the gate/up weight types; zero the node's output
//   A. tasks (expert, slice of its intermediate rows): gate/up gemm for the expert's tokens, bias,
//      activation, then quantize h for the down weight type (slices are whole activation blocks)
//   B. tasks (slice of the hidden rows): for every active expert, down gemm accumulated into the output
//      scaled by the routing weight (experts in ascending order: results do not depend on threads)
// then the last node to finish adds the other nodes' partial outputs into `out`. Before phase 0 one
// worker plans the call (routing pairs grouped by expert, task lists, scratch sizes).
//
// Concurrency: a call is a MoeCall (pool_call.h) owned by its caller; any number may be in flight, from
// any threads. The layer's routing tables and scratch are touched only inside the calls' jobs, which the
// pool runs one at a time, so calls never see each other's state and results do not depend on timing.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "quant/kernels.h"
#include "runtime/node_buffer.h"
#include "runtime/pool_call.h"
#include "runtime/thread_pool.h"

namespace ktinject {

struct MoeSpec {
  int64_t num_experts = 0;
  int64_t hidden = 0;
  int64_t intermediate = 0;
  WeightType gate_type = WeightType::F32;
  WeightType up_type = WeightType::F32;
  WeightType down_type = WeightType::F32;
  ActParams act;  // act.gated == false: no gate weights, h = act(up x)
  bool has_bias = false;
};

class MoeLayer;

// One call: out[T, hidden] = MoE(x[T, hidden]) with ids/weights [T, top_k]. The caller keeps the buffers
// alive and unchanged until finish() returns.
class MoeCall : public PoolCall {
 public:
  MoeCall(MoeLayer& layer, const float* x, int64_t tokens, const int64_t* ids, const float* weights, int64_t top_k,
          float* out);
  void run(int node, int local) override;

  MoeLayer& layer;
  const float* x;
  const int64_t tokens;
  const int64_t* ids;
  const float* weights;
  const int64_t top_k;
  float* out;
  std::atomic<int> nodes_done{0};
};

class MoeLayer {
 public:
  // Throws std::invalid_argument naming the bad field (shapes that the weight types cannot tile...).
  MoeLayer(const MoeSpec& spec, std::shared_ptr<ThreadPool> pool, Isa isa);
  ~MoeLayer();
  MoeLayer(const MoeLayer&) = delete;
  MoeLayer& operator=(const MoeLayer&) = delete;

  const MoeSpec& spec() const { return spec_; }
  Isa isa() const { return isa_; }
  const ThreadPool& pool() const { return *pool_; }
  const std::shared_ptr<ThreadPool>& shared_pool() const { return pool_; }
  // The intermediate slice [i0, i1) held by node group n.
  std::pair<int64_t, int64_t> slice(int node) const { return {nodes_[node]->i0, nodes_[node]->i1}; }
  // Bytes of packed weights over all nodes (the GGUF size, plus row padding to tiles of 16).
  size_t weight_bytes() const;
  bool all_loaded() const;

  // Packs experts [first, first + n) into node-local memory, on the pool (blocking). gate/up hold
  // n * intermediate rows of row_bytes(gate_type/up_type, hidden) bytes; down holds n * hidden rows of
  // row_bytes(down_type, intermediate) bytes (GGUF layout, experts back to back). gate is null (and
  // ignored) when the experts are not gated.
  void load(int64_t first, int64_t n, const uint8_t* gate, const uint8_t* up, const uint8_t* down);
  // gate_bias/up_bias [E, intermediate], down_bias [E, hidden], float32 (gate_bias null when not gated).
  // Required before submit() when spec.has_bias.
  void load_bias(const float* gate_bias, const float* up_bias, const float* down_bias);

  // Checks `call`'s inputs and starts it; returns at once (after the pool's job in flight, if any).
  // Throws std::invalid_argument (nothing started) on an expert id out of range (an id equal to
  // num_experts marks an unused slot, transformers' convention) or when the weights are not loaded.
  // End the call with call.finish(), which rethrows an error raised by a worker.
  void submit(MoeCall& call);
  // Throws std::invalid_argument unless the weights (and biases, if any) are loaded: what submit() checks
  // besides the expert ids. For operators that run this layer inside their own jobs (MoeCall::run).
  void check_ready() const;

  // Test hook: the next call raises std::runtime_error inside a worker.
  void fail_next_call() { fail_next_.store(true); }

 private:
  friend class MoeCall;
  struct TaskA {
    int64_t expert, r0, r1;
  };
  struct Node {
    int64_t i0 = 0, i1 = 0;
    size_t gate_bytes = 0, up_bytes = 0, down_bytes = 0;
    NodeBuffer weights;
    std::vector<float> gate_bias, up_bias;  // [E, i1 - i0]
    // scratch of the call being run
    NodeBuffer xq_gate, xq_up, hq, partial, scratch;
    std::vector<const uint8_t*> act_gate, act_up, act_h;  // per pair
    std::vector<float*> out_rows;                         // per pair
    std::vector<TaskA> tasks_a;
    int64_t chunk_b = 0, n_tasks_b = 0;
    size_t scratch_per_thread = 0;
    alignas(64) std::atomic<int64_t> next_a{0};
    alignas(64) std::atomic<int64_t> next_b{0};
    NodeBarrier barrier;
    int64_t inter() const { return i1 - i0; }
  };
  class LoadJob;

  const uint8_t* gate_of(const Node& n, int64_t e) const;
  const uint8_t* up_of(const Node& n, int64_t e) const;
  const uint8_t* down_of(const Node& n, int64_t e) const;
  void plan_call(const MoeCall& call);
  void plan_node(const MoeCall& call, size_t ni);
  void run_call(MoeCall& call, int node, int local);
  void phase_a(const MoeCall& call, Node& nd, int local, const TaskA& task);
  void phase_b(const MoeCall& call, Node& nd, int node, int64_t task);

  MoeSpec spec_;
  std::shared_ptr<ThreadPool> pool_;
  Isa isa_;
  std::vector<std::unique_ptr<Node>> nodes_;
  mutable std::mutex loaded_mu_;
  std::vector<char> loaded_;
  std::vector<float> down_bias_;  // [E, hidden]; added once, by node 0
  std::atomic<bool> bias_loaded_{false};
  std::atomic<bool> fail_next_{false};

  // The call being run (written by its planning worker, read by all after the start barrier).
  std::vector<int64_t> offsets_;     // pairs of expert e: [offsets_[e], offsets_[e+1])
  std::vector<int64_t> pair_token_;  // token of each pair, grouped by expert
  std::vector<float> pair_weight_;
  std::vector<int64_t> active_;  // experts with pairs, ascending
  std::vector<int64_t> fill_, order_;
  bool plan_failed_ = false;
  NodeBarrier start_barrier_;  // every worker of the pool: planning done
};

}  // namespace ktinject
