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

RouterLayer::RouterLayer(LinearLayer& gate, int64_t top_k, RouterSelect select)
    : gate_(gate), top_k_(top_k), select_(std::move(select)), pool_(gate.shared_pool()) {
  const int64_t E = gate.spec().rows;
  if (top_k < 1 || top_k > E)
    throw std::invalid_argument("top_k must be in [1, experts=" + std::to_string(E) + "], got " +
                                std::to_string(top_k));
  if (select_.score == RouterSelect::Score::kSigmoid) {
    const int64_t G = select_.groups;
    if (G < 1 || E % G != 0)
      throw std::invalid_argument("groups must divide the " + std::to_string(E) + " experts, got " + std::to_string(G));
    if (G > 1 && E / G < 2)
      throw std::invalid_argument("groups are ranked by their two best experts: each needs at least 2, got " +
                                  std::to_string(E / G));
    if (select_.topk_groups < 1 || select_.topk_groups > G)
      throw std::invalid_argument("topk_groups must be in [1, groups=" + std::to_string(G) + "], got " +
                                  std::to_string(select_.topk_groups));
    if (top_k > select_.topk_groups * (E / G))
      throw std::invalid_argument("top_k " + std::to_string(top_k) + " is more than the " +
                                  std::to_string(select_.topk_groups * (E / G)) + " experts of the kept groups");
    if (!select_.bias.empty() && static_cast<int64_t>(select_.bias.size()) != E)
      throw std::invalid_argument("bias must have experts=" + std::to_string(E) + " elements, got " +
                                  std::to_string(select_.bias.size()));
    if (!std::isfinite(select_.scale)) throw std::invalid_argument("scale must be finite");
  }
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
  const float* logit = call.logits + t * experts();
  float* weights = call.weights + t * top_k_;
  int64_t* ids = call.ids + t * top_k_;
  if (select_.score == RouterSelect::Score::kSoftmax)
    select_softmax(logit, weights, ids);
  else
    select_sigmoid(logit, weights, ids);
}

namespace {

// The k largest of value[0, n) as indices, descending, ties to the lower index (a NaN never wins).
void top_indices(const float* value, int64_t n, int64_t k, std::vector<int64_t>& order) {
  order.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int64_t a, int64_t b) { return value[a] > value[b] || (!(value[b] > value[a]) && a < b); });
}

bool any_nan(const float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (std::isnan(v[i])) return true;
  return false;
}

}  // namespace

void RouterLayer::select_softmax(const float* logit, float* weights, int64_t* ids) const {
  const int64_t E = experts(), k = top_k_;
  thread_local std::vector<float> prob;
  thread_local std::vector<int64_t> order;
  prob.resize(static_cast<size_t>(E));
  float top = -INFINITY;
  for (int64_t e = 0; e < E; ++e) top = std::max(top, logit[e]);
  const bool nan = any_nan(logit, E);
  float sum = 0.0f;
  for (int64_t e = 0; e < E; ++e) sum += prob[e] = std::exp(logit[e] - top);
  for (int64_t e = 0; e < E; ++e) prob[e] = nan ? NAN : prob[e] / sum;
  top_indices(prob.data(), E, k, order);
  float kept = 0.0f;
  for (int64_t j = 0; j < k; ++j) kept += prob[order[j]];
  const float scale = select_.normalize ? 1.0f / kept : 1.0f;
  for (int64_t j = 0; j < k; ++j) {
    ids[j] = order[j];
    weights[j] = prob[order[j]] * scale;
  }
}

void RouterLayer::select_sigmoid(const float* logit, float* weights, int64_t* ids) const {
  const int64_t E = experts(), k = top_k_, G = select_.groups, per_group = E / G;
  thread_local std::vector<float> score, choice, group_score;
  thread_local std::vector<int64_t> order, groups;
  thread_local std::vector<char> kept;
  score.resize(static_cast<size_t>(E));
  choice.resize(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) {
    score[e] = 1.0f / (1.0f + std::exp(-logit[e]));
    choice[e] = score[e] + (select_.bias.empty() ? 0.0f : select_.bias[e]);
  }
  if (any_nan(choice.data(), E)) {
    for (int64_t j = 0; j < k; ++j) {
      ids[j] = j;
      weights[j] = NAN;
    }
    return;
  }
  if (G > 1) {  // keep the experts of the best topk_groups groups (the others' choices drop to -inf)
    group_score.resize(static_cast<size_t>(G));
    for (int64_t g = 0; g < G; ++g) {
      const float* c = choice.data() + g * per_group;
      float first = -INFINITY, second = -INFINITY;
      for (int64_t i = 0; i < per_group; ++i) {
        if (c[i] > first) {
          second = first;
          first = c[i];
        } else if (c[i] > second) {
          second = c[i];
        }
      }
      group_score[g] = first + second;
    }
    top_indices(group_score.data(), G, select_.topk_groups, groups);
    kept.assign(static_cast<size_t>(G), 0);
    for (int64_t j = 0; j < select_.topk_groups; ++j) kept[groups[j]] = 1;
    for (int64_t e = 0; e < E; ++e)
      if (!kept[e / per_group]) choice[e] = -INFINITY;
  }
  top_indices(choice.data(), E, k, order);
  float sum = 0.0f;
  for (int64_t j = 0; j < k; ++j) sum += score[order[j]];
  for (int64_t j = 0; j < k; ++j) {  // as transformers computes it: divided by the sum, then scaled
    ids[j] = order[j];
    const float w = select_.normalize ? score[order[j]] / (sum + 1e-20f) : score[order[j]];
    weights[j] = w * select_.scale;
  }
}

}  // namespace ktinject
