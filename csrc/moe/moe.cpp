#include "moe/moe.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <string>

namespace ktinject {
namespace {

constexpr int64_t kSubBatch = 64;       // tokens per phase-A gemm call (bounds the per-thread scratch)
constexpr int64_t kTasksPerThread = 4;  // phase A tasks per thread (8 measured 4% slower at one token: shorter streams)
// Phase B reads, per task, a slice of every active expert's down weights: slices under this size measured
// 3% slower per layer at one token (110 KiB vs 442 KiB; hardware prefetchers ramp up per stream), so phase
// B has fewer, longer tasks when the down weights are small.
constexpr size_t kMinDownSliceBytes = size_t{256} << 10;

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Intermediate slices are whole 16-row tiles and whole activation blocks of the down weight type, so a
// slice's h quantizes exactly as the full vector's would.
int64_t slice_granularity(WeightType down) { return std::max<int64_t>(kTileRows, act_block_elems(down)); }

void check_cols(const char* what, WeightType t, int64_t cols) {
  if (cols % col_granularity(t) != 0)
    throw std::invalid_argument(std::string(what) + ": " + std::to_string(cols) + " columns is not a multiple of " +
                                std::to_string(col_granularity(t)) + ", which " + weight_type_name(t) + " needs");
}

}  // namespace

MoeCall::MoeCall(MoeLayer& layer_, const float* x_, int64_t tokens_, const int64_t* ids_, const float* weights_,
                 int64_t top_k_, float* out_)
    : PoolCall(layer_.shared_pool()),
      layer(layer_),
      x(x_),
      tokens(tokens_),
      ids(ids_),
      weights(weights_),
      top_k(top_k_),
      out(out_) {}

void MoeCall::run(int node, int local) { layer.run_call(*this, node, local); }

// Packs weights: a list of pieces (tile ranges of one matrix) per node, taken by that node's workers, so
// each page is first written, and kept, by the node that will read it.
class MoeLayer::LoadJob : public PoolCall {
 public:
  struct Piece {
    const uint8_t* src;
    size_t stride;
    WeightType type;
    int64_t rows, cols, tile0, tile1;
    uint8_t* dst;
  };
  explicit LoadJob(MoeLayer* layer)
      : PoolCall(layer->pool_), pieces(layer->nodes_.size()), next_(layer->nodes_.size()) {
    for (auto& c : next_) c.store(0);
  }
  void run(int node, int /*local*/) override {
    try {
      const auto& list = pieces[node];
      for (size_t i = next_[node].fetch_add(1); i < list.size(); i = next_[node].fetch_add(1)) {
        const Piece& p = list[i];
        pack_tiles(p.type, p.src, p.stride, p.rows, p.cols, p.tile0, p.tile1, p.dst);
      }
    } catch (...) {
      record_error(std::current_exception());
    }
  }
  std::vector<std::vector<Piece>> pieces;  // per node

 private:
  std::vector<std::atomic<size_t>> next_;
};

MoeLayer::MoeLayer(const MoeSpec& spec, std::shared_ptr<ThreadPool> pool, Isa isa)
    : spec_(spec), pool_(std::move(pool)), isa_(isa) {
  if (spec.num_experts <= 0) throw std::invalid_argument("num_experts must be > 0");
  if (spec.hidden <= 0) throw std::invalid_argument("hidden must be > 0");
  if (spec.intermediate <= 0) throw std::invalid_argument("intermediate must be > 0");
  if (!spec.act.gated) spec_.gate_type = spec.up_type;  // no gate weights: x is quantized once, for up
  if (!spec.act.gated && !activation_is_elementwise(spec.act.kind))
    throw std::invalid_argument("this activation needs a gate projection (gated=false)");
  check_cols("gate weights (hidden)", spec_.gate_type, spec.hidden);
  check_cols("up weights (hidden)", spec.up_type, spec.hidden);
  check_cols("down weights (intermediate)", spec.down_type, spec.intermediate);
  if (!isa_available(isa)) throw std::invalid_argument(std::string("ISA ") + isa_name(isa) + " is not available here");
  const int n_nodes = pool_->nodes();
  const int64_t gran = slice_granularity(spec.down_type);
  const int64_t units = ceil_div(spec.intermediate, gran);
  int64_t next_unit = 0;
  for (int n = 0; n < n_nodes; ++n) {
    auto nd = std::make_unique<Node>();
    const int64_t take = units / n_nodes + (n < units % n_nodes ? 1 : 0);
    nd->i0 = std::min(next_unit * gran, spec.intermediate);
    nd->i1 = std::min((next_unit + take) * gran, spec.intermediate);
    next_unit += take;
    const int64_t inter = nd->inter();
    if (inter > 0) {
      nd->gate_bytes = spec.act.gated ? packed_bytes(spec_.gate_type, inter, spec.hidden) : 0;
      nd->up_bytes = packed_bytes(spec.up_type, inter, spec.hidden);
      nd->down_bytes = packed_bytes(spec.down_type, spec.hidden, inter);
      const size_t per_expert = nd->gate_bytes + nd->up_bytes + nd->down_bytes;
      nd->weights.reserve(per_expert * static_cast<size_t>(spec.num_experts), pool_->layout().memory_node[n]);
    }
    nd->barrier.reset(pool_->threads_in(n));
    nodes_.push_back(std::move(nd));
  }
  loaded_.assign(spec.num_experts, 0);
  offsets_.assign(spec.num_experts + 1, 0);
  start_barrier_.reset(pool_->threads());
}

// Calls hold a reference to their layer and are finished (or waited for) before it goes away.
MoeLayer::~MoeLayer() = default;

size_t MoeLayer::weight_bytes() const {
  size_t total = 0;
  for (const auto& nd : nodes_) total += (nd->gate_bytes + nd->up_bytes + nd->down_bytes) * spec_.num_experts;
  return total;
}

bool MoeLayer::all_loaded() const {
  std::lock_guard<std::mutex> lock(loaded_mu_);
  return std::all_of(loaded_.begin(), loaded_.end(), [](char c) { return c != 0; });
}

const uint8_t* MoeLayer::gate_of(const Node& n, int64_t e) const {
  return n.weights.data() + e * (n.gate_bytes + n.up_bytes + n.down_bytes);
}
const uint8_t* MoeLayer::up_of(const Node& n, int64_t e) const { return gate_of(n, e) + n.gate_bytes; }
const uint8_t* MoeLayer::down_of(const Node& n, int64_t e) const { return up_of(n, e) + n.up_bytes; }

void MoeLayer::load(int64_t first, int64_t n, const uint8_t* gate, const uint8_t* up, const uint8_t* down) {
  if (first < 0 || n < 0 || first + n > spec_.num_experts)
    throw std::invalid_argument("experts [" + std::to_string(first) + ", " + std::to_string(first + n) +
                                ") are outside [0, " + std::to_string(spec_.num_experts) + ")");
  const int64_t H = spec_.hidden, I = spec_.intermediate;
  const size_t gate_rb = row_bytes(spec_.gate_type, H), up_rb = row_bytes(spec_.up_type, H);
  const size_t down_rb = row_bytes(spec_.down_type, I);
  LoadJob job(this);
  constexpr int64_t kTilesPerPiece = 32;
  for (size_t ni = 0; ni < nodes_.size(); ++ni) {
    Node& nd = *nodes_[ni];
    const int64_t inter = nd.inter();
    if (inter == 0) continue;
    const size_t down_col_off =
        static_cast<size_t>(nd.i0 / block_elems(spec_.down_type)) * block_bytes(spec_.down_type);
    for (int64_t e = first; e < first + n; ++e) {
      const int64_t k = e - first;
      const auto add = [&](const uint8_t* src, size_t stride, WeightType t, int64_t rows, int64_t cols,
                           const uint8_t* dst) {
        const int64_t tiles = num_tiles(rows);
        for (int64_t t0 = 0; t0 < tiles; t0 += kTilesPerPiece)
          job.pieces[ni].push_back(
              {src, stride, t, rows, cols, t0, std::min(tiles, t0 + kTilesPerPiece), const_cast<uint8_t*>(dst)});
      };
      if (spec_.act.gated) add(gate + (k * I + nd.i0) * gate_rb, gate_rb, spec_.gate_type, inter, H, gate_of(nd, e));
      add(up + (k * I + nd.i0) * up_rb, up_rb, spec_.up_type, inter, H, up_of(nd, e));
      add(down + k * H * down_rb + down_col_off, down_rb, spec_.down_type, H, inter, down_of(nd, e));
    }
  }
  job.start();
  job.finish();
  std::lock_guard<std::mutex> lock(loaded_mu_);
  std::fill(loaded_.begin() + first, loaded_.begin() + first + n, 1);
}

void MoeLayer::load_bias(const float* gate_bias, const float* up_bias, const float* down_bias) {
  if (!spec_.has_bias) throw std::invalid_argument("this layer was created without biases (has_bias=false)");
  const int64_t E = spec_.num_experts, I = spec_.intermediate, H = spec_.hidden;
  pool_->exclusive([&] {  // calls in flight read the biases
    for (auto& nd : nodes_) {
      const int64_t inter = nd->inter();
      nd->gate_bias.assign(spec_.act.gated ? E * inter : 0, 0.0f);
      nd->up_bias.assign(E * inter, 0.0f);
      for (int64_t e = 0; e < E; ++e) {
        if (spec_.act.gated)
          std::copy(gate_bias + e * I + nd->i0, gate_bias + e * I + nd->i1, nd->gate_bias.begin() + e * inter);
        std::copy(up_bias + e * I + nd->i0, up_bias + e * I + nd->i1, nd->up_bias.begin() + e * inter);
      }
    }
    down_bias_.assign(down_bias, down_bias + E * H);
  });
  bias_loaded_.store(true);
}

// ---------------------------------------------------------------------------------------------------
// A call

void MoeLayer::check_ready() const {
  if (!all_loaded()) throw std::invalid_argument("the experts' weights are not all loaded yet");
  if (spec_.has_bias && !bias_loaded_.load())
    throw std::invalid_argument("this layer has biases, but load_bias() was not called");
}

void MoeLayer::submit(MoeCall& call) {
  check_ready();
  const int64_t E = spec_.num_experts, n = call.tokens * call.top_k;
  for (int64_t i = 0; i < n; ++i)
    if (call.ids[i] < 0 || call.ids[i] > E)
      throw std::invalid_argument("top_k_index[" + std::to_string(i / call.top_k) + ", " +
                                  std::to_string(i % call.top_k) + "] = " + std::to_string(call.ids[i]) +
                                  " is not an expert id (0.." + std::to_string(E - 1) + ", or " + std::to_string(E) +
                                  " for an unused slot)");
  if (call.tokens > 0) call.start();
}

// Routing pairs grouped by expert (counting sort), then each node's buffers and task lists.
void MoeLayer::plan_call(const MoeCall& call) {
  const int64_t E = spec_.num_experts, n = call.tokens * call.top_k;
  std::fill(offsets_.begin(), offsets_.end(), 0);
  for (int64_t i = 0; i < n; ++i)
    if (call.ids[i] < E) ++offsets_[call.ids[i] + 1];
  active_.clear();
  for (int64_t e = 0; e < E; ++e) {
    if (offsets_[e + 1] > 0) active_.push_back(e);
    offsets_[e + 1] += offsets_[e];
  }
  const int64_t pairs = offsets_[E];
  pair_token_.resize(pairs);
  pair_weight_.resize(pairs);
  fill_.assign(offsets_.begin(), offsets_.end() - 1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = call.ids[i];
    if (e >= E) continue;
    const int64_t p = fill_[e]++;
    pair_token_[p] = i / call.top_k;
    pair_weight_[p] = call.weights[i];
  }
  // Phase A order: experts with the most tokens first, so the long tasks do not come last.
  order_ = active_;
  std::stable_sort(order_.begin(), order_.end(),
                   [&](int64_t a, int64_t b) { return offsets_[a + 1] - offsets_[a] > offsets_[b + 1] - offsets_[b]; });
  for (size_t ni = 0; ni < nodes_.size(); ++ni) plan_node(call, ni);
}

void MoeLayer::plan_node(const MoeCall& call, size_t ni) {
  const int64_t H = spec_.hidden, tokens = call.tokens;
  const int64_t pairs = offsets_[spec_.num_experts];
  Node& nd = *nodes_[ni];
  const int mem = pool_->layout().memory_node[ni];
  const int threads = pool_->threads_in(static_cast<int>(ni));
  const int64_t inter = nd.inter();
  const size_t xg = act_row_bytes(spec_.gate_type, H), xu = act_row_bytes(spec_.up_type, H);
  nd.xq_gate.reserve(std::max<size_t>(1, tokens * xg), mem);
  if (spec_.up_type != spec_.gate_type) nd.xq_up.reserve(std::max<size_t>(1, tokens * xu), mem);
  const uint8_t* xq_up = spec_.up_type != spec_.gate_type ? nd.xq_up.data() : nd.xq_gate.data();
  const size_t hb = inter > 0 ? act_row_bytes(spec_.down_type, inter) : 0;
  nd.hq.reserve(std::max<size_t>(1, pairs * hb), mem);
  float* out_base = call.out;
  if (ni > 0) {
    nd.partial.reserve(std::max<size_t>(1, tokens * H * sizeof(float)), mem);
    out_base = reinterpret_cast<float*>(nd.partial.data());
  }
  nd.act_gate.resize(pairs);
  nd.act_up.resize(pairs);
  nd.act_h.resize(pairs);
  nd.out_rows.resize(pairs);
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t t = pair_token_[p];
    nd.act_gate[p] = nd.xq_gate.data() + t * xg;
    nd.act_up[p] = xq_up + t * xu;
    nd.act_h[p] = nd.hq.data() + p * hb;
    nd.out_rows[p] = out_base + t * H;
  }
  // Phase A tasks: split each expert's slice so that there are enough tasks per thread that the last
  // ones are short (a thread that finishes early waits at the barrier for the longest straggler).
  nd.tasks_a.clear();
  int64_t chunk = 0;
  if (inter > 0 && !order_.empty()) {
    const int64_t gran = slice_granularity(spec_.down_type);
    const int64_t per_expert =
        std::max<int64_t>(1, ceil_div(kTasksPerThread * threads, static_cast<int64_t>(order_.size())));
    chunk = std::min(round_up(ceil_div(inter, per_expert), gran), round_up(inter, kTileRows));
    for (int64_t e : order_)
      for (int64_t r0 = 0; r0 < inter; r0 += chunk) nd.tasks_a.push_back({e, r0, std::min(inter, r0 + chunk)});
  }
  nd.scratch_per_thread =
      static_cast<size_t>(2 * kSubBatch * round_up(std::max<int64_t>(chunk, 1), kTileRows)) * sizeof(float);
  nd.scratch.reserve(nd.scratch_per_thread * threads, mem);
  // Phase B tasks: slices of the hidden rows, the same number for every thread (1 to kTasksPerThread).
  const size_t down_bytes = static_cast<size_t>(H) * (inter > 0 ? row_bytes(spec_.down_type, inter) : 0);
  const int64_t per_thread = std::clamp<int64_t>(
      static_cast<int64_t>(down_bytes / (static_cast<size_t>(threads) * kMinDownSliceBytes)), 1, kTasksPerThread);
  nd.chunk_b = std::max<int64_t>(kTileRows, round_up(ceil_div(H, per_thread * threads), kTileRows));
  nd.n_tasks_b = ceil_div(H, nd.chunk_b);
  nd.next_a.store(0);
  nd.next_b.store(0);
}

void MoeLayer::run_call(MoeCall& call, int node, int local) {
  // Planning: one worker, while the others wait at the pool-wide barrier.
  if (node == 0 && local == 0) {
    plan_failed_ = false;
    try {
      plan_call(call);
    } catch (...) {
      plan_failed_ = true;
      call.record_error(std::current_exception());
    }
  }
  start_barrier_.arrive_and_wait();
  if (plan_failed_) return;
  Node& nd = *nodes_[node];
  const int threads = pool_->threads_in(node);
  const int64_t H = spec_.hidden, tokens = call.tokens;
  // Phase 0: quantize x, zero this node's output.
  try {
    for (int64_t t = local; t < tokens; t += threads) {
      const float* x = call.x + t * H;
      quantize_act_cols(isa_, spec_.gate_type, x, H, 0, H, nd.xq_gate.data() + t * act_row_bytes(spec_.gate_type, H));
      if (spec_.up_type != spec_.gate_type)
        quantize_act_cols(isa_, spec_.up_type, x, H, 0, H, nd.xq_up.data() + t * act_row_bytes(spec_.up_type, H));
      float* o = node == 0 ? call.out + t * H : reinterpret_cast<float*>(nd.partial.data()) + t * H;
      std::memset(o, 0, H * sizeof(float));
    }
  } catch (...) {
    call.record_error(std::current_exception());
  }
  nd.barrier.arrive_and_wait();
  // Phase A
  try {
    if (node == 0 && local == 0 && fail_next_.exchange(false)) {
      throw std::runtime_error("injected failure in a worker (MoeLayer test hook)");
    }
    const int64_t n_tasks = static_cast<int64_t>(nd.tasks_a.size());
    for (int64_t i = nd.next_a.fetch_add(1); i < n_tasks && !call.cancelled(); i = nd.next_a.fetch_add(1))
      phase_a(call, nd, local, nd.tasks_a[i]);
  } catch (...) {
    call.record_error(std::current_exception());
  }
  nd.barrier.arrive_and_wait();
  // Phase B
  try {
    for (int64_t i = nd.next_b.fetch_add(1); i < nd.n_tasks_b && !call.cancelled(); i = nd.next_b.fetch_add(1))
      phase_b(call, nd, node, i);
  } catch (...) {
    call.record_error(std::current_exception());
  }
  nd.barrier.arrive_and_wait();
  // The last node to finish adds the other nodes' partials (in node order, so the sum is deterministic).
  if (local == 0 && call.nodes_done.fetch_add(1) == static_cast<int>(nodes_.size()) - 1) {
    for (size_t ni = 1; ni < nodes_.size(); ++ni) {
      const float* part = reinterpret_cast<const float*>(nodes_[ni]->partial.data());
      for (int64_t i = 0; i < tokens * H; ++i) call.out[i] += part[i];
    }
  }
}

void MoeLayer::phase_a(const MoeCall& call, Node& nd, int local, const TaskA& task) {
  const int64_t H = spec_.hidden, inter = nd.inter();
  const int64_t e = task.expert, rows = task.r1 - task.r0;
  const int64_t ld = round_up(rows, kTileRows);  // scratch row stride
  float* g = reinterpret_cast<float*>(nd.scratch.data() + local * nd.scratch_per_thread);
  float* u = g + kSubBatch * ld;
  float* g_rows[kSubBatch];
  float* u_rows[kSubBatch];
  for (int64_t i = 0; i < kSubBatch; ++i) {
    g_rows[i] = g + i * ld;
    u_rows[i] = u + i * ld;
  }
  const int64_t tile0 = task.r0 / kTileRows, n_tiles = num_tiles(rows);
  const bool gated = spec_.act.gated;
  for (int64_t p0 = offsets_[e]; p0 < offsets_[e + 1] && !call.cancelled(); p0 += kSubBatch) {
    const int64_t n = std::min(kSubBatch, offsets_[e + 1] - p0);
    // Not gated: the up projection goes where the gate's would, and the activation reads it alone.
    if (gated)
      gemm(isa_, spec_.gate_type, gate_of(nd, e), inter, H, tile0, n_tiles, nd.act_gate.data() + p0, n,
           GemmOut{g_rows, 0, nullptr});
    gemm(isa_, spec_.up_type, up_of(nd, e), inter, H, tile0, n_tiles, nd.act_up.data() + p0, n,
         GemmOut{gated ? u_rows : g_rows, 0, nullptr});
    for (int64_t i = 0; i < n; ++i) {
      if (spec_.has_bias) {
        const float* ub = nd.up_bias.data() + e * inter + task.r0;
        float* u = gated ? u_rows[i] : g_rows[i];
        for (int64_t r = 0; r < rows; ++r) u[r] += ub[r];
        if (gated) {
          const float* gb = nd.gate_bias.data() + e * inter + task.r0;
          for (int64_t r = 0; r < rows; ++r) g_rows[i][r] += gb[r];
        }
      }
      activate(isa_, spec_.act, g_rows[i], gated ? u_rows[i] : nullptr, rows);
      quantize_act_cols(isa_, spec_.down_type, g_rows[i], inter, task.r0, rows, const_cast<uint8_t*>(nd.act_h[p0 + i]));
    }
  }
}

void MoeLayer::phase_b(const MoeCall& call, Node& nd, int node, int64_t task) {
  const int64_t H = spec_.hidden, inter = nd.inter();
  const int64_t h0 = task * nd.chunk_b, h1 = std::min(H, h0 + nd.chunk_b);
  const int64_t tile0 = h0 / kTileRows, n_tiles = num_tiles(h1 - h0);
  for (int64_t e : active_) {
    if (call.cancelled()) return;
    const int64_t p0 = offsets_[e], n = offsets_[e + 1] - p0;
    if (inter > 0)
      gemm(isa_, spec_.down_type, down_of(nd, e), H, inter, tile0, n_tiles, nd.act_h.data() + p0, n,
           GemmOut{nd.out_rows.data() + p0, h0, pair_weight_.data() + p0});
    if (spec_.has_bias && node == 0) {
      const float* db = down_bias_.data() + e * H;
      for (int64_t i = 0; i < n; ++i) {
        float* o = nd.out_rows[p0 + i];
        const float w = pair_weight_[p0 + i];
        for (int64_t h = h0; h < h1; ++h) o[h] += w * db[h];
      }
    }
  }
}

}  // namespace ktinject
