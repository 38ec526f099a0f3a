#include "layer/decoder_layer.h"

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
      logits(static_cast<size_t>(batch * tokens * layer_.router_.experts())),
      weights(static_cast<size_t>(batch * tokens * layer_.router_.top_k())),
      moe_out(attn_out.size()),
      ids(weights.size()),
      attend(layer_.attention_, q, batch, tokens, keys, values, n_keys, mask, ctx.data(), attn_out.data()),
      route(layer_.router_, h2.data(), batch * tokens, logits.data(), weights.data(), ids.data()),
      experts(layer_.experts_, h2.data(), batch * tokens, ids.data(), weights.data(), layer_.router_.top_k(),
              moe_out.data()) {}

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
  each(route);
  each(experts);
  if (first_worker(node, local))
    for (int64_t i = 0; i < rows * H; ++i) store(out, i, x1[i] + moe_out[i]);
}

void LayerPostCall::finish_all() {
  finish();
  attend.finish_all();
  route.finish_all();
  experts.finish();
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
  if (cancelled()) pre.cancel();
  pre.run(node, local);
  layer.barrier_.arrive_and_wait();  // every worker's share of q, k, v is written
  if (first_worker(node, local) && !cancelled()) {
    const AttentionSpec& s = layer.attention_.spec();
    append_kv(keys, k.data(), batch, tokens, s.kv_heads, s.head_dim, n_past);
    append_kv(values, v.data(), batch, tokens, s.kv_heads, s.head_dim, n_past);
  }
  layer.barrier_.arrive_and_wait();
  if (cancelled()) post.cancel();
  post.run(node, local);
}

void LayerStepCall::finish_all() {
  finish();
  pre.finish_all();
  post.finish_all();
}

DecoderLayer::DecoderLayer(AttentionLayer& attention, RouterLayer& router, MoeLayer& experts,
                           std::vector<float> input_norm, float input_eps, std::vector<float> post_norm, float post_eps)
    : attention_(attention),
      router_(router),
      experts_(experts),
      input_norm_(std::move(input_norm)),
      post_norm_(std::move(post_norm)),
      input_eps_(input_eps),
      post_eps_(post_eps),
      pool_(attention.shared_pool()) {
  const int64_t H = attention.spec().hidden;
  if (router.hidden() != H || experts.spec().hidden != H)
    throw std::invalid_argument("attention, router and experts must have one width: " + std::to_string(H) + ", " +
                                std::to_string(router.hidden()) + ", " + std::to_string(experts.spec().hidden));
  if (router.experts() > experts.spec().num_experts)
    throw std::invalid_argument("the router chooses among " + std::to_string(router.experts()) +
                                " experts, the experts module has " + std::to_string(experts.spec().num_experts));
  if (static_cast<int64_t>(input_norm_.size()) != H || static_cast<int64_t>(post_norm_.size()) != H)
    throw std::invalid_argument("the norms' weights must have hidden (" + std::to_string(H) + ") elements");
  for (float eps : {input_eps, post_eps})
    if (!(eps >= 0.0f) || !std::isfinite(eps)) throw std::invalid_argument("norm eps must be finite and >= 0");
  if (router.shared_pool() != pool_ || experts.shared_pool() != pool_)
    throw std::invalid_argument("attention, router and experts must share one thread pool (threads, numa_nodes)");
  barrier_.reset(pool_->threads());
}

void DecoderLayer::check_ready() const {
  attention_.submit_check();
  router_.check_ready();
  experts_.check_ready();
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
