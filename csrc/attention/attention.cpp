#include "attention/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "quant/half.h"

namespace ktinject {
namespace {

std::string shape_text(const LinearLayer& l) {
  return "[" + std::to_string(l.spec().rows) + ", " + std::to_string(l.spec().cols) + "]";
}

void check_projection(const LinearLayer& l, const char* name, int64_t rows, int64_t cols) {
  if (l.spec().rows != rows || l.spec().cols != cols)
    throw std::invalid_argument(std::string(name) + " is " + shape_text(l) + " (out, in), expected [" +
                                std::to_string(rows) + ", " + std::to_string(cols) + "]");
}

// x <- x / rms(x) * w over one head (float32 throughout, as transformers' RMSNorm computes it).
void rms_norm(float* x, const float* w, int64_t n, float eps) {
  float ss = 0.0f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] * r * w[i];
}

// Rotate-half rotary embedding over x[0, rot): x1 = x[:rot/2], x2 = x[rot/2:rot];
// x <- x * cos + cat(-x2, x1) * sin.
void rotate_half(float* x, const float* cos, const float* sin, int64_t rot) {
  const int64_t h = rot / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * cos[i] - b * sin[i];
    x[i + h] = b * cos[i + h] + a * sin[i + h];
  }
}

}  // namespace

void attend_group(Isa isa, const float* q, int64_t heads, int64_t head_dim, const KvRows& keys, const KvRows& values,
                  int64_t n_keys, const KeyMask& mask, float scale, float* scores, float* out) {
#if defined(KTINJECT_QUANT_X86)
  if (isa == Isa::Avx512)
    return attend_group_avx512(q, heads, head_dim, keys, values, n_keys, mask, scale, scores, out);
  if (isa == Isa::Avx2) return attend_group_avx2(q, heads, head_dim, keys, values, n_keys, mask, scale, scores, out);
#endif
  (void)isa;
  attend_group_scalar(q, heads, head_dim, keys, values, n_keys, mask, scale, scores, out);
}

// ---- calls ------------------------------------------------------------------------------------------

ProjectCall::ProjectCall(AttentionLayer& layer_, const float* x, int64_t tokens_, const float* cos_, const float* sin_,
                         int64_t rot_, float* q_, float* k_, float* v)
    : PoolCall(layer_.shared_pool()),
      layer(layer_),
      tokens(tokens_),
      rot(rot_),
      cos(cos_),
      sin(sin_),
      q(q_),
      k(k_),
      q_call(layer_.q_, x, tokens_, q_),
      k_call(layer_.k_, x, tokens_, k_),
      v_call(layer_.v_, x, tokens_, v) {}

void ProjectCall::run(int node, int local) {
  if (cancelled()) {
    q_call.cancel();
    k_call.cancel();
    v_call.cancel();
  }
  // Every worker runs every phase (the barriers count them all), whatever happened before.
  layer.q_.run_part(q_call, node, local);
  layer.k_.run_part(k_call, node, local);
  layer.v_.run_part(v_call, node, local);
  layer.barrier_.arrive_and_wait();
  try {
    if (!cancelled()) layer.norm_rope(*this, layer.worker_index(node, local));
  } catch (...) {
    record_error(std::current_exception());
  }
}

void ProjectCall::finish_all() {
  finish();
  q_call.finish();  // never started: rethrows what a worker recorded in it, if anything
  k_call.finish();
  v_call.finish();
}

AttendCall::AttendCall(AttentionLayer& layer_, const float* q_, int64_t batch_, int64_t tokens_, const KvView& keys_,
                       const KvView& values_, int64_t n_keys_, const MaskView& mask_, float* ctx_, float* out)
    : PoolCall(layer_.shared_pool()),
      layer(layer_),
      q(q_),
      batch(batch_),
      tokens(tokens_),
      n_keys(n_keys_),
      keys(keys_),
      values(values_),
      mask(mask_),
      ctx(ctx_),
      o_call(layer_.o_, ctx_, batch_ * tokens_, out) {}

void AttendCall::run(int node, int local) {
  try {
    if (!cancelled()) layer.attend_rows(*this, layer.worker_index(node, local));
  } catch (...) {
    record_error(std::current_exception());
  }
  layer.barrier_.arrive_and_wait();
  if (cancelled()) o_call.cancel();
  layer.o_.run_part(o_call, node, local);
}

void AttendCall::finish_all() {
  finish();
  o_call.finish();
}

namespace {

void append_rows(const KvView& dst, const float* src, int64_t batch, int64_t tokens, int64_t kv_heads, int64_t head_dim,
                 int64_t n_past) {
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t h = 0; h < kv_heads; ++h) {
        const float* row = src + ((b * tokens + t) * kv_heads + h) * head_dim;
        const int64_t at = b * dst.stride_b + h * dst.stride_h + (n_past + t) * dst.stride_s;
        if (dst.bf16) {
          uint16_t* o = static_cast<uint16_t*>(const_cast<void*>(dst.data)) + at;
          for (int64_t d = 0; d < head_dim; ++d) o[d] = float_to_bf16(row[d]);
        } else {
          std::memcpy(static_cast<float*>(const_cast<void*>(dst.data)) + at, row, sizeof(float) * head_dim);
        }
      }
}

}  // namespace

void append_kv(const AttentionSpec& spec, const KvView& keys, const KvView& values, const float* k, const float* v,
               int64_t batch, int64_t tokens, int64_t n_past) {
  append_rows(keys, k, batch, tokens, spec.kv_heads, spec.head_dim, n_past);
  append_rows(values, v, batch, tokens, spec.kv_heads, spec.head_dim, n_past);
}

AttentionStepCall::AttentionStepCall(AttentionLayer& layer_, const float* x, int64_t batch_, int64_t tokens_,
                                     const float* cos, const float* sin, int64_t rot, const KvView& keys_,
                                     const KvView& values_, int64_t n_past_, const MaskView& mask, float* out)
    : PoolCall(layer_.shared_pool()),
      layer(layer_),
      batch(batch_),
      tokens(tokens_),
      n_past(n_past_),
      keys(keys_),
      values(values_),
      q(static_cast<size_t>(batch_ * tokens_ * layer_.spec().heads * layer_.spec().head_dim)),
      k(static_cast<size_t>(batch_ * tokens_ * layer_.spec().kv_heads * layer_.spec().head_dim)),
      v(k.size()),
      ctx(q.size()),
      project(layer_, x, batch_ * tokens_, cos, sin, rot, q.data(), k.data(), v.data()),
      attend(layer_, q.data(), batch_, tokens_, keys_, values_, n_past_ + tokens_, mask, ctx.data(), out) {}

void AttentionStepCall::run(int node, int local) {
  run_decode_step(*this, project, attend, layer.barrier_, node, local,
                  [&] { append_kv(layer.spec(), keys, values, k.data(), v.data(), batch, tokens, n_past); });
}

void AttentionStepCall::finish_all() {
  finish();
  project.finish_all();
  attend.finish_all();
}

// ---- layer ------------------------------------------------------------------------------------------

AttentionLayer::AttentionLayer(const AttentionSpec& spec, LinearLayer& q, LinearLayer& k, LinearLayer& v,
                               LinearLayer& o, std::vector<float> q_norm, std::vector<float> k_norm)
    : spec_(spec),
      q_(q),
      k_(k),
      v_(v),
      o_(o),
      q_norm_(std::move(q_norm)),
      k_norm_(std::move(k_norm)),
      pool_(q.shared_pool()),
      isa_(q.isa()) {
  const AttentionSpec& s = spec;
  if (s.hidden <= 0 || s.heads <= 0 || s.kv_heads <= 0 || s.head_dim <= 0)
    throw std::invalid_argument("hidden, heads, kv_heads and head_dim must be > 0");
  if (s.heads % s.kv_heads != 0)
    throw std::invalid_argument("heads (" + std::to_string(s.heads) + ") must be a multiple of kv_heads (" +
                                std::to_string(s.kv_heads) + ")");
  if (!(s.scale > 0.0f) || !std::isfinite(s.scale)) throw std::invalid_argument("scale must be finite and > 0");
  check_projection(q, "q_proj", s.heads * s.head_dim, s.hidden);
  check_projection(k, "k_proj", s.kv_heads * s.head_dim, s.hidden);
  check_projection(v, "v_proj", s.kv_heads * s.head_dim, s.hidden);
  check_projection(o, "o_proj", s.hidden, s.heads * s.head_dim);
  for (const LinearLayer* l : {&k, &v, &o})
    if (l->shared_pool() != pool_ || l->isa() != isa_)
      throw std::invalid_argument("q/k/v/o projections must share one thread pool (threads, numa_nodes) and ISA");
  for (const auto* w : {&q_norm_, &k_norm_})
    if (!w->empty() && static_cast<int64_t>(w->size()) != s.head_dim)
      throw std::invalid_argument("q_norm / k_norm weights must have head_dim (" + std::to_string(s.head_dim) +
                                  ") elements, got " + std::to_string(w->size()));
  if ((!q_norm_.empty() || !k_norm_.empty()) && (!(s.norm_eps >= 0.0f) || !std::isfinite(s.norm_eps)))
    throw std::invalid_argument("norm_eps must be finite and >= 0");
  int first = 0;
  for (int n = 0; n < pool_->nodes(); ++n) {
    first_worker_.push_back(first);
    first += pool_->threads_in(n);
  }
  barrier_.reset(pool_->threads());
}

void AttentionLayer::submit_check() const {
  for (const LinearLayer* l : {&q_, &k_, &v_, &o_}) l->check_ready();
}

void AttentionLayer::submit(ProjectCall& call) {
  submit_check();
  if (call.tokens > 0) call.start();
}

void AttentionLayer::submit(AttentionStepCall& call) {
  submit_check();
  if (call.batch * call.tokens > 0) call.start();
}

void AttentionLayer::submit(AttendCall& call) {
  submit_check();
  if (call.batch * call.tokens > 0) call.start();
}

void AttentionLayer::norm_rope(const ProjectCall& call, int worker) const {
  const int64_t hd = spec_.head_dim, H = spec_.heads, KV = spec_.kv_heads;
  const int64_t per_token = H + KV, rows = call.tokens * per_token;
  for (int64_t r = worker; r < rows; r += pool_->threads()) {
    const int64_t t = r / per_token, j = r % per_token;
    const bool is_q = j < H;
    float* x = is_q ? call.q + (t * H + j) * hd : call.k + (t * KV + (j - H)) * hd;
    const std::vector<float>& w = is_q ? q_norm_ : k_norm_;
    if (!w.empty()) rms_norm(x, w.data(), hd, spec_.norm_eps);
    if (call.rot > 0) rotate_half(x, call.cos + t * call.rot, call.sin + t * call.rot, call.rot);
  }
}

void AttentionLayer::attend_rows(const AttendCall& call, int worker) const {
  const int64_t hd = spec_.head_dim, H = spec_.heads, group = spec_.heads / spec_.kv_heads;
  const int64_t T = call.tokens, S = call.n_keys, units = call.batch * T * spec_.kv_heads;
  // A task is (batch row, token, KV head, a slice of its query heads): whole groups read each cached row
  // once for all their heads; with few such units the groups are sliced so every worker has two tasks.
  const int64_t want = 2 * pool_->threads();
  const int64_t slices = std::min(group, std::max<int64_t>(1, (want + units - 1) / units));
  const int64_t per_slice = (group + slices - 1) / slices, n_slices = (group + per_slice - 1) / per_slice;
  thread_local std::vector<float> scores;
  if (static_cast<int64_t>(scores.size()) < per_slice * S) scores.resize(static_cast<size_t>(per_slice * S));
  const size_t k_elem = call.keys.bf16 ? 2 : 4, v_elem = call.values.bf16 ? 2 : 4;
  for (int64_t r = worker; r < units * n_slices && !call.cancelled(); r += pool_->threads()) {
    const int64_t unit = r / n_slices, slice = r % n_slices;
    const int64_t b = unit / (T * spec_.kv_heads), t = (unit / spec_.kv_heads) % T, kvh = unit % spec_.kv_heads;
    const int64_t h0 = kvh * group + slice * per_slice, heads = std::min(per_slice, (kvh + 1) * group - h0);
    const int64_t row = b * T + t;
    KvRows keys{static_cast<const char*>(call.keys.data) +
                    (b * call.keys.stride_b + kvh * call.keys.stride_h) * static_cast<int64_t>(k_elem),
                call.keys.stride_s, call.keys.bf16};
    KvRows values{static_cast<const char*>(call.values.data) +
                      (b * call.values.stride_b + kvh * call.values.stride_h) * static_cast<int64_t>(v_elem),
                  call.values.stride_s, call.values.bf16};
    KeyMask m;
    const MaskView& mv = call.mask;
    if (mv.allow == nullptr && mv.add == nullptr) {
      m.last = S - T + t;
    } else {
      m.last = S - 1;
      const int64_t off = b * mv.stride_b + t * mv.stride_t;
      if (mv.allow != nullptr) m.allow = mv.allow + off;
      if (mv.add != nullptr) m.add = mv.add + off;
      if (m.allow != nullptr)  // keys after the last visible one need not be looked at (a static cache's tail)
        while (m.last >= 0 && m.allow[m.last] == 0) --m.last;
    }
    attend_group(isa_, call.q + (row * H + h0) * hd, heads, hd, keys, values, S, m, spec_.scale, scores.data(),
                 call.ctx + (row * H + h0) * hd);
  }
}

}  // namespace ktinject
