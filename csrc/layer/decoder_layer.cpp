#include "layer/decoder_layer.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "norm/rms_norm.h"
#include "quant/half.h"

namespace ktinject {
namespace {

bool first_worker(int node, int local) { return node == 0 && local == 0; }

float stream_at(const StreamIn& s, int64_t i) {
  return s.bf16 ? bf16_to_float(static_cast<const uint16_t*>(s.data)[i]) : static_cast<const float*>(s.data)[i];
}

void store(const StreamOut& s, int64_t i, float v) {
  if (s.bf16)
    static_cast<uint16_t*>(s.data)[i] = float_to_bf16(v);
  else
    static_cast<float*>(s.data)[i] = v;
}

}  // namespace

LayerPreCall::LayerPreCall(DecoderLayer& layer_, StreamIn x_, int64_t tokens_, const float* cos, const float* sin,
                           int64_t rot, float* q, StreamOut k, StreamOut v)
    : PoolCall(layer_.shared_pool()),
      layer(layer_),
      x(x_),
      tokens(tokens_),
      k_out(k),
      v_out(v),
      h(static_cast<size_t>(tokens_ * layer_.hidden())),
      k32(k.bf16 ? static_cast<size_t>(tokens_ * layer_.kv_width()) : 0),
      v32(v.bf16 ? static_cast<size_t>(tokens_ * layer_.kv_width()) : 0),
      project(layer_.attention_, h.data(), tokens_, cos, sin, rot, q, k.bf16 ? k32.data() : static_cast<float*>(k.data),
              v.bf16 ? v32.data() : static_cast<float*>(v.data)) {}

void LayerPreCall::run(int node, int local) {
  const int64_t H = layer.hidden();
  if (first_worker(node, local)) {
    try {
      if (x.bf16) {
        for (int64_t i = 0; i < tokens * H; ++i) h[i] = stream_at(x, i);
        rms_norm_rows(h.data(), layer.input_norm_.data(), tokens, H, layer.input_eps_, h.data());
      } else {
        rms_norm_rows(static_cast<const float*>(x.data), layer.input_norm_.data(), tokens, H, layer.input_eps_,
                      h.data());
      }
    } catch (...) {
      record_error(std::current_exception());
    }
  }
  layer.barrier_.arrive_and_wait();
  if (cancelled()) project.cancel();
  project.run(node, local);
  if (!k_out.bf16 && !v_out.bf16) return;
  layer.barrier_.arrive_and_wait();
  if (first_worker(node, local)) {
    const int64_t n = tokens * layer.kv_width();
    for (int64_t i = 0; i < n; ++i) {
      if (k_out.bf16) store(k_out, i, k32[i]);
      if (v_out.bf16) store(v_out, i, v32[i]);
    }
  }
}

void LayerPreCall::finish_all() {
  finish();
  project.finish_all();
}

LayerPostCall::LayerPostCall(DecoderLayer& layer_, const float* q, int64_t batch, int64_t tokens, const KvView& keys,
                             const KvView& values, int64_t n_keys, const MaskView& mask, StreamIn x_, StreamOut out_)
    : PoolCall(layer_.shared_pool()),
      layer(layer_),
      x(x_),
      rows(batch * tokens),
      out(out_),
      ctx(static_cast<size_t>(batch * tokens * layer_.attention_.spec().heads * layer_.attention_.spec().head_dim)),
      attn_out(static_cast<size_t>(batch * tokens * layer_.hidden())),
      x1(attn_out.size()),
      h2(attn_out.size()),
      logits(layer_.router_ ? static_cast<size_t>(rows * layer_.router_->experts()) : 0),
      weights(layer_.router_ ? static_cast<size_t>(rows * layer_.router_->top_k()) : 0),
      moe_out(layer_.router_ ? attn_out.size() : 0),
      g(static_cast<size_t>(rows * layer_.mlp_width())),
      u(g.size()),
      a(g.size()),
      mlp_out(layer_.mlp_.present() ? attn_out.size() : 0),
      mlp_scale(layer_.mlp_.shared_gate ? static_cast<size_t>(rows) : 0),
      ids(weights.size()),
      attend(layer_.attention_, q, batch, tokens, keys, values, n_keys, mask, ctx.data(), attn_out.data()) {
  if (layer.router_) {
    route.emplace(*layer.router_, h2.data(), rows, logits.data(), weights.data(), ids.data());
    experts.emplace(*layer.experts_, h2.data(), rows, ids.data(), weights.data(), layer.router_->top_k(),
                    moe_out.data());
  }
  if (layer.mlp_.present()) {
    gate_call.emplace(*layer.mlp_.gate, h2.data(), rows, g.data());
    up_call.emplace(*layer.mlp_.up, h2.data(), rows, u.data());
    down_call.emplace(*layer.mlp_.down, a.data(), rows, mlp_out.data());
    if (layer.mlp_.shared_gate) shared_gate_call.emplace(*layer.mlp_.shared_gate, h2.data(), rows, mlp_scale.data());
  }
}

// a = silu(g) * u over this worker's share of the rows' elements.
void LayerPostCall::activate(int worker) {
  const int64_t n = static_cast<int64_t>(a.size()), workers = layer.pool_->threads();
  const int64_t chunk = (n + workers - 1) / workers, i0 = std::min(n, worker * chunk), i1 = std::min(n, i0 + chunk);
  for (int64_t i = i0; i < i1; ++i) a[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

void LayerPostCall::run(int node, int local) {
  const int64_t H = layer.hidden();
  const auto each = [&](PoolCall& part) {  // every worker runs every phase, then waits for all of them
    if (cancelled()) part.cancel();
    part.run(node, local);
    layer.barrier_.arrive_and_wait();
  };
  each(attend);
  if (first_worker(node, local)) {
    try {
      for (int64_t i = 0; i < rows * H; ++i) x1[i] = stream_at(x, i) + attn_out[i];
      rms_norm_rows(x1.data(), layer.post_norm_.data(), rows, H, layer.post_eps_, h2.data());
    } catch (...) {
      record_error(std::current_exception());
    }
  }
  layer.barrier_.arrive_and_wait();
  if (route) {
    each(*route);
    each(*experts);
  }
  if (gate_call) {
    if (cancelled()) {
      gate_call->cancel();
      up_call->cancel();
      if (shared_gate_call) shared_gate_call->cancel();
    }
    layer.mlp_.gate->run_part(*gate_call, node, local);
    layer.mlp_.up->run_part(*up_call, node, local);
    if (shared_gate_call) layer.mlp_.shared_gate->run_part(*shared_gate_call, node, local);
    layer.barrier_.arrive_and_wait();
    if (!cancelled()) activate(layer.first_worker_[node] + local);
    layer.barrier_.arrive_and_wait();
    if (cancelled()) down_call->cancel();
    layer.mlp_.down->run_part(*down_call, node, local);
    layer.barrier_.arrive_and_wait();
  }
  if (first_worker(node, local)) {
    // As transformers adds them: x1 + (experts + shared MLP), or x1 + the one that is there.
    for (int64_t r = 0; r < rows; ++r) {
      const float scale = shared_gate_call ? 1.0f / (1.0f + std::exp(-mlp_scale[r])) : 1.0f;
      for (int64_t i = r * H; i < (r + 1) * H; ++i) {
        const float mlp = gate_call ? scale * mlp_out[i] : 0.0f;
        const float ffn = route ? (gate_call ? moe_out[i] + mlp : moe_out[i]) : mlp;
        store(out, i, x1[i] + ffn);
      }
    }
  }
}

void LayerPostCall::finish_all() {
  finish();
  attend.finish_all();
  if (route) {
    route->finish_all();
    experts->finish();
  }
  if (gate_call) {
    gate_call->finish();
    up_call->finish();
    down_call->finish();
  }
  if (shared_gate_call) shared_gate_call->finish();
}

LayerStepCall::LayerStepCall(DecoderLayer& layer_, StreamIn x, int64_t batch_, int64_t tokens_, const float* cos,
                             const float* sin, int64_t rot, const KvView& keys_, const KvView& values_, int64_t n_past_,
                             const MaskView& mask, StreamOut out)
    : PoolCall(layer_.shared_pool()),
      layer(layer_),
      batch(batch_),
      tokens(tokens_),
      n_past(n_past_),
      keys(keys_),
      values(values_),
      q(static_cast<size_t>(batch_ * tokens_ * layer_.attention_.spec().heads * layer_.attention_.spec().head_dim)),
      k(static_cast<size_t>(batch_ * tokens_ * layer_.kv_width())),
      v(k.size()),
      pre(layer_, x, batch_ * tokens_, cos, sin, rot, q.data(), StreamOut{k.data(), false}, StreamOut{v.data(), false}),
      post(layer_, q.data(), batch_, tokens_, keys_, values_, n_past_ + tokens_, mask, x, out) {}

void LayerStepCall::run(int node, int local) {
  run_decode_step(*this, pre, post, layer.barrier_, node, local,
                  [&] { append_kv(layer.attention_.spec(), keys, values, k.data(), v.data(), batch, tokens, n_past); });
}

void LayerStepCall::finish_all() {
  finish();
  pre.finish_all();
  post.finish_all();
}

DecoderLayer::DecoderLayer(AttentionLayer& attention, RouterLayer* router, MoeLayer* experts, MlpLayers mlp,
                           std::vector<float> input_norm, float input_eps, std::vector<float> post_norm, float post_eps)
    : attention_(attention),
      router_(router),
      experts_(experts),
      mlp_(mlp),
      input_norm_(std::move(input_norm)),
      post_norm_(std::move(post_norm)),
      input_eps_(input_eps),
      post_eps_(post_eps),
      pool_(attention.shared_pool()) {
  const int64_t H = attention.spec().hidden;
  const auto width = [](int64_t v) { return std::to_string(v); };
  if ((router == nullptr) != (experts == nullptr))
    throw std::invalid_argument("router and experts come together (a MoE block) or not at all");
  if ((mlp.gate == nullptr) != (mlp.up == nullptr) || (mlp.gate == nullptr) != (mlp.down == nullptr))
    throw std::invalid_argument("the MLP needs all three of gate, up and down (or none)");
  if (router == nullptr && !mlp.present())
    throw std::invalid_argument("a layer needs routed experts, an MLP or both after its attention");
  if (router != nullptr) {
    if (router->hidden() != H || experts->spec().hidden != H)
      throw std::invalid_argument("attention, router and experts must have one width: " + width(H) + ", " +
                                  width(router->hidden()) + ", " + width(experts->spec().hidden));
    if (router->experts() > experts->spec().num_experts)
      throw std::invalid_argument("the router chooses among " + width(router->experts()) +
                                  " experts, the experts module has " + width(experts->spec().num_experts));
    if (router->shared_pool() != pool_ || experts->shared_pool() != pool_)
      throw std::invalid_argument("attention, router and experts must share one thread pool (threads, numa_nodes)");
  }
  if (mlp.present()) {
    const LinearSpec &g = mlp.gate->spec(), &u = mlp.up->spec(), &d = mlp.down->spec();
    if (g.cols != H || u.cols != H || d.rows != H || u.rows != g.rows || d.cols != g.rows)
      throw std::invalid_argument("the MLP must map hidden " + width(H) + " -> inter -> hidden: gate [" +
                                  width(g.rows) + ", " + width(g.cols) + "], up [" + width(u.rows) + ", " +
                                  width(u.cols) + "], down [" + width(d.rows) + ", " + width(d.cols) + "]");
    if (mlp.gate->shared_pool() != pool_ || mlp.up->shared_pool() != pool_ || mlp.down->shared_pool() != pool_)
      throw std::invalid_argument("attention and the MLP must share one thread pool (threads, numa_nodes)");
  }
  if (mlp.shared_gate != nullptr) {
    if (!mlp.present()) throw std::invalid_argument("shared_gate scales the MLP: it needs gate, up and down");
    if (mlp.shared_gate->spec().rows != 1 || mlp.shared_gate->spec().cols != H)
      throw std::invalid_argument("shared_gate must be [1, hidden " + width(H) + "], got [" +
                                  width(mlp.shared_gate->spec().rows) + ", " + width(mlp.shared_gate->spec().cols) +
                                  "]");
    if (mlp.shared_gate->shared_pool() != pool_)
      throw std::invalid_argument("attention and the MLP must share one thread pool (threads, numa_nodes)");
  }
  if (static_cast<int64_t>(input_norm_.size()) != H || static_cast<int64_t>(post_norm_.size()) != H)
    throw std::invalid_argument("the norms' weights must have hidden (" + width(H) + ") elements");
  for (float eps : {input_eps, post_eps})
    if (!(eps >= 0.0f) || !std::isfinite(eps)) throw std::invalid_argument("norm eps must be finite and >= 0");
  int first = 0;
  for (int n = 0; n < pool_->nodes(); ++n) {
    first_worker_.push_back(first);
    first += pool_->threads_in(n);
  }
  barrier_.reset(pool_->threads());
}

void DecoderLayer::check_ready() const {
  attention_.submit_check();
  if (router_ != nullptr) {
    router_->check_ready();
    experts_->check_ready();
  }
  if (mlp_.present()) {
    mlp_.gate->check_ready();
    mlp_.up->check_ready();
    mlp_.down->check_ready();
  }
  if (mlp_.shared_gate != nullptr) mlp_.shared_gate->check_ready();
}

void DecoderLayer::submit(LayerPreCall& call) {
  attention_.submit_check();
  if (call.tokens > 0) call.start();
}

void DecoderLayer::submit(LayerPostCall& call) {
  check_ready();
  if (call.rows > 0) call.start();
}

void DecoderLayer::submit(LayerStepCall& call) {
  check_ready();
  if (call.batch * call.tokens > 0) call.start();
}

}  // namespace ktinject
