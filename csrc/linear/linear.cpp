#include "linear/linear.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace ktinject {
namespace {

constexpr int64_t kLinearSubBatch = 64;  // tokens per gemm call
// A task's weights stay in L2 while every token sub-batch streams over them (prefill); at one token a task
// is simply a long stream. Half of a 2 MiB L2, leaving room for activations and outputs.
constexpr size_t kTaskWeightBytes = size_t{1} << 20;
constexpr int64_t kTasksPerThread = 2;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

LinearCall::LinearCall(LinearLayer& layer_, const float* x_, int64_t tokens_, float* out_)
    : PoolCall(layer_.shared_pool()), layer(layer_), x(x_), tokens(tokens_), out(out_) {}

void LinearCall::run(int node, int local) { layer.run_call(*this, node, local); }

class LinearLayer::LoadJob : public PoolCall {
 public:
  LoadJob(LinearLayer& layer, int64_t first, int64_t n, const uint8_t* data)
      : PoolCall(layer.pool_), layer_(layer), first_(first), n_(n), data_(data), next_(layer.nodes_.size()) {
    for (auto& c : next_) c.store(0);
  }
  // Each node's workers pack the tiles of [first, first + n) that fall in that node's rows, so every page
  // is first written by the node that reads it.
  void run(int node, int /*local*/) override {
    try {
      Node& nd = *layer_.nodes_[node];
      const int64_t lo = std::max(first_, nd.r0), hi = std::min(first_ + n_, nd.r1);
      if (lo >= hi) return;
      const WeightType t = layer_.spec_.type;
      const int64_t cols = layer_.spec_.cols;
      const size_t rb = row_bytes(t, cols);
      // Rows [lo, hi) as a matrix of their own: they start at a tile boundary of the node's packed slice.
      const uint8_t* src = data_ + (lo - first_) * static_cast<int64_t>(rb);
      uint8_t* dst = nd.weights.data() + ((lo - nd.r0) / kTileRows) * tile_bytes(t, cols);
      const int64_t tiles = num_tiles(hi - lo);
      constexpr int64_t kTilesPerPiece = 16;
      for (int64_t piece = next_[node].fetch_add(1);; piece = next_[node].fetch_add(1)) {
        const int64_t a = piece * kTilesPerPiece;
        if (a >= tiles) break;
        pack_tiles(t, src, rb, hi - lo, cols, a, std::min(tiles, a + kTilesPerPiece), dst);
      }
    } catch (...) {
      record_error(std::current_exception());
    }
  }

 private:
  LinearLayer& layer_;
  int64_t first_, n_;
  const uint8_t* data_;
  std::vector<std::atomic<int64_t>> next_;
};

LinearLayer::LinearLayer(const LinearSpec& spec, std::shared_ptr<ThreadPool> pool, Isa isa)
    : spec_(spec), pool_(std::move(pool)), isa_(isa) {
  if (spec.rows <= 0) throw std::invalid_argument("rows (out_features) must be > 0, got " + std::to_string(spec.rows));
  if (spec.cols <= 0) throw std::invalid_argument("cols (in_features) must be > 0, got " + std::to_string(spec.cols));
  if (spec.cols % col_granularity(spec.type) != 0)
    throw std::invalid_argument("in_features " + std::to_string(spec.cols) + " is not a multiple of " +
                                std::to_string(col_granularity(spec.type)) + ", which " + weight_type_name(spec.type) +
                                " needs");
  if (!isa_available(isa)) throw std::invalid_argument(std::string("ISA ") + isa_name(isa) + " is not available here");
  act_bytes_ = act_row_bytes(spec.type, spec.cols);
  const int n_nodes = pool_->nodes();
  const int64_t tiles = num_tiles(spec.rows);
  int64_t next = 0;
  for (int n = 0; n < n_nodes; ++n) {
    auto nd = std::make_unique<Node>();
    const int64_t take = tiles / n_nodes + (n < tiles % n_nodes ? 1 : 0);
    nd->r0 = std::min(next * kTileRows, spec.rows);
    nd->r1 = std::min((next + take) * kTileRows, spec.rows);
    next += take;
    if (nd->rows() > 0)
      nd->weights.reserve(packed_bytes(spec.type, nd->rows(), spec.cols), pool_->layout().memory_node[n]);
    nd->barrier.reset(pool_->threads_in(n));
    nodes_.push_back(std::move(nd));
  }
  loaded_tiles_.assign(tiles, 0);
}

std::pair<int64_t, int64_t> LinearLayer::slice(int node) const { return {nodes_[node]->r0, nodes_[node]->r1}; }

size_t LinearLayer::weight_bytes() const {
  size_t total = 0;
  for (const auto& nd : nodes_) total += nd->rows() > 0 ? packed_bytes(spec_.type, nd->rows(), spec_.cols) : 0;
  return total;
}

bool LinearLayer::all_loaded() const {
  std::lock_guard<std::mutex> lock(loaded_mu_);
  return std::all_of(loaded_tiles_.begin(), loaded_tiles_.end(), [](char c) { return c != 0; });
}

void LinearLayer::load(int64_t first, int64_t n, const uint8_t* rows_data) {
  if (first < 0 || n <= 0 || first + n > spec_.rows)
    throw std::invalid_argument("rows [" + std::to_string(first) + ", " + std::to_string(first + n) +
                                ") are outside [0, " + std::to_string(spec_.rows) + ")");
  if (first % kTileRows != 0 || (n % kTileRows != 0 && first + n != spec_.rows))
    throw std::invalid_argument("rows are loaded in whole tiles of 16 (the last range may end at the last row), got [" +
                                std::to_string(first) + ", " + std::to_string(first + n) + ")");
  LoadJob job(*this, first, n, rows_data);
  job.start();
  job.finish();
  std::lock_guard<std::mutex> lock(loaded_mu_);
  std::fill(loaded_tiles_.begin() + first / kTileRows, loaded_tiles_.begin() + num_tiles(first + n), 1);
}

void LinearLayer::load_bias(const float* bias) {
  if (!spec_.has_bias) throw std::invalid_argument("this layer was created without a bias (has_bias=false)");
  pool_->exclusive([&] { bias_.assign(bias, bias + spec_.rows); });  // calls in flight read it
  bias_loaded_.store(true);
}

void LinearLayer::check_ready() const {
  if (!all_loaded()) throw std::invalid_argument("the weights are not all loaded yet");
  if (spec_.has_bias && !bias_loaded_.load())
    throw std::invalid_argument("this layer has a bias, but load_bias() was not called");
}

void LinearLayer::submit(LinearCall& call) {
  check_ready();
  if (call.tokens > 0) call.start();
}

void LinearLayer::run_call(LinearCall& call, int node, int local) {
  Node& nd = *nodes_[node];
  if (nd.rows() == 0) return;
  const int threads = pool_->threads_in(node);
  const int64_t T = call.tokens, cols = spec_.cols;
  // Few tokens: one worker quantizes them (a second barrier would cost more than the work).
  const bool shared_quantize = T >= 2 * threads;
  try {
    if (local == 0) {
      nd.xq.reserve(static_cast<size_t>(T) * act_bytes_, pool_->layout().memory_node[node]);
      const int64_t n_tiles = num_tiles(nd.rows());
      const size_t tile_weights = tile_bytes(spec_.type, cols);
      const int64_t fit = std::max<int64_t>(1, static_cast<int64_t>(kTaskWeightBytes / tile_weights));
      nd.tiles_per_task = std::min(fit, ceil_div(n_tiles, kTasksPerThread * threads));
      if (T <= kLinearSubBatch)
        nd.tiles_per_task = ceil_div(n_tiles, kTasksPerThread * threads);  // one pass: long streams
      nd.n_tasks = ceil_div(n_tiles, nd.tiles_per_task);
      nd.next.store(0);
      if (!shared_quantize)
        for (int64_t t = 0; t < T; ++t)
          quantize_act_cols(isa_, spec_.type, call.x + t * cols, cols, 0, cols, nd.xq.data() + t * act_bytes_);
    }
  } catch (...) {
    call.record_error(std::current_exception());
  }
  nd.barrier.arrive_and_wait();
  if (shared_quantize) {
    try {
      for (int64_t t = local; t < T; t += threads)
        quantize_act_cols(isa_, spec_.type, call.x + t * cols, cols, 0, cols, nd.xq.data() + t * act_bytes_);
    } catch (...) {
      call.record_error(std::current_exception());
    }
    nd.barrier.arrive_and_wait();
  }
  try {
    for (int64_t task = nd.next.fetch_add(1); task < nd.n_tasks && !call.cancelled(); task = nd.next.fetch_add(1))
      run_task(call, nd, task);
  } catch (...) {
    call.record_error(std::current_exception());
  }
}

void LinearLayer::run_task(const LinearCall& call, Node& nd, int64_t task) {
  const int64_t T = call.tokens, rows = spec_.rows, cols = spec_.cols;
  const int64_t tile0 = task * nd.tiles_per_task;
  const int64_t n_tiles = std::min(nd.tiles_per_task, num_tiles(nd.rows()) - tile0);
  const int64_t col0 = nd.r0 + tile0 * kTileRows;  // first output column of this task
  const int64_t col1 = std::min(nd.r1, col0 + n_tiles * kTileRows);
  const uint8_t* act[kLinearSubBatch];
  float* out_rows[kLinearSubBatch];
  for (int64_t t0 = 0; t0 < T && !call.cancelled(); t0 += kLinearSubBatch) {
    const int64_t n = std::min(kLinearSubBatch, T - t0);
    for (int64_t i = 0; i < n; ++i) {
      act[i] = nd.xq.data() + (t0 + i) * act_bytes_;
      out_rows[i] = call.out + (t0 + i) * rows;
    }
    gemm(isa_, spec_.type, nd.weights.data(), nd.rows(), cols, tile0, n_tiles, act, n,
         GemmOut{out_rows, col0, nullptr});
    if (spec_.has_bias)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t c = col0; c < col1; ++c) out_rows[i][c] += bias_[c];
  }
}

}  // namespace ktinject
