#include "moe/router.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace ktinject {

RouterCall::RouterCall(RouterLayer& layer_, const float* x, int64_t tokens_, float* logits_, float* weights_,
                       int64_t* ids_)
    : PoolCall(layer_.shared_pool()),
      layer(layer_),
      tokens(tokens_),
      logits(logits_),
      weights(weights_),
      ids(ids_),
      gate_call(layer_.gate_, x, tokens_, logits_) {}

void RouterCall::run(int node, int local) {
  if (cancelled()) gate_call.cancel();
  layer.gate_.run_part(gate_call, node, local);
  layer.barrier_.arrive_and_wait();
  try {
    const int worker = layer.first_worker_[node] + local, workers = layer.pool_->threads();
    for (int64_t t = worker; t < tokens && !cancelled(); t += workers) layer.select(*this, t);
  } catch (...) {
    record_error(std::current_exception());
  }
}

void RouterCall::finish_all() {
  finish();
  gate_call.finish();
}

RouterLayer::RouterLayer(LinearLayer& gate, int64_t top_k, bool normalize)
    : gate_(gate), top_k_(top_k), normalize_(normalize), pool_(gate.shared_pool()) {
  if (top_k < 1 || top_k > gate.spec().rows)
    throw std::invalid_argument("top_k must be in [1, experts=" + std::to_string(gate.spec().rows) + "], got " +
                                std::to_string(top_k));
  int first = 0;
  for (int n = 0; n < pool_->nodes(); ++n) {
    first_worker_.push_back(first);
    first += pool_->threads_in(n);
  }
  barrier_.reset(pool_->threads());
}

void RouterLayer::submit(RouterCall& call) {
  gate_.check_ready();
  if (call.tokens > 0) call.start();
}

void RouterLayer::select(const RouterCall& call, int64_t t) const {
  const int64_t E = experts(), k = top_k_;
  const float* logit = call.logits + t * E;
  thread_local std::vector<float> prob;
  thread_local std::vector<int64_t> order;
  prob.resize(static_cast<size_t>(E));
  order.resize(static_cast<size_t>(E));
  float top = -INFINITY;
  bool nan = false;
  for (int64_t e = 0; e < E; ++e) {
    top = std::max(top, logit[e]);
    nan |= std::isnan(logit[e]);
  }
  float sum = 0.0f;
  for (int64_t e = 0; e < E; ++e) sum += prob[e] = std::exp(logit[e] - top);
  for (int64_t e = 0; e < E; ++e) {
    prob[e] = nan ? NAN : prob[e] / sum;
    order[e] = e;
  }
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int64_t a, int64_t b) { return prob[a] > prob[b] || (!(prob[b] > prob[a]) && a < b); });
  float kept = 0.0f;
  for (int64_t j = 0; j < k; ++j) kept += prob[order[j]];
  const float scale = normalize_ ? 1.0f / kept : 1.0f;
  for (int64_t j = 0; j < k; ++j) {
    call.ids[t * k + j] = order[j];
    call.weights[t * k + j] = prob[order[j]] * scale;
  }
}

}  // namespace ktinject
