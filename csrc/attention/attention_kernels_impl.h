// One source for every ISA build of attend_group (attention_kernels.h): GCC vector extensions of 16 floats,
// which each unit's target flags turn into one AVX-512 register, two AVX2 registers or four SSE registers.
// Included once per unit; everything is static so no unit's code is shared with another's (see
// CMakeLists.txt: code compiled for one ISA must never run on a CPU without it).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attention/attention_kernels.h"

namespace ktinject {
namespace {

typedef float F32x16 __attribute__((vector_size(64)));
typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));

inline F32x16 load16(const float* p) {
  F32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline F32x16 load16(const uint16_t* p) {  // bfloat16 bits -> float32 (exact)
  U16x16 h;
  std::memcpy(&h, p, sizeof h);
  const U32x16 w = __builtin_convertvector(h, U32x16) << 16;
  F32x16 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}
inline void store16(float* p, F32x16 v) { std::memcpy(p, &v, sizeof v); }
inline float to_f32(float x) { return x; }
inline float to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}

template <typename T>
inline float dot(const float* q, const T* k, int64_t n) {
  F32x16 a0 = {}, a1 = {};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 += load16(q + i) * load16(k + i);
    a1 += load16(q + i + 16) * load16(k + i + 16);
  }
  for (; i + 16 <= n; i += 16) a0 += load16(q + i) * load16(k + i);
  a0 += a1;
  float s = 0.0f;
  for (int j = 0; j < 16; ++j) s += a0[j];
  for (; i < n; ++i) s += q[i] * to_f32(k[i]);
  return s;
}

template <typename T>
inline void axpy(float a, const T* v, float* y, int64_t n) {
  const F32x16 av = F32x16{} + a;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(y + i, load16(y + i) + av * load16(v + i));
  for (; i < n; ++i) y[i] += a * to_f32(v[i]);
}

typedef int32_t I32x16 __attribute__((vector_size(64)));

// exp(x) for 16 floats: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-6 Taylor polynomial (relative
// error < 2e-7), times 2^n built in the exponent bits. Inputs below -87 give ~1e-38 (callers zero what they
// hide); NaN stays NaN.
inline F32x16 exp16(F32x16 x) {
  const F32x16 lo = F32x16{} - 87.0f, hi = F32x16{} + 88.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const F32x16 t = x * 1.44269504f + 0.5f;
  I32x16 n = __builtin_convertvector(t, I32x16);  // truncates toward zero
  n += __builtin_convertvector(n, F32x16) > t;    // floor for negative t (a true compare is -1)
  const F32x16 nf = __builtin_convertvector(n, F32x16);
  const F32x16 r = (x - nf * 0.693145752f) - nf * 1.42860677e-06f;
  F32x16 p = F32x16{} + (1.0f / 720);
  p = p * r + (1.0f / 120);
  p = p * r + (1.0f / 24);
  p = p * r + (1.0f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const I32x16 bits = (n + 127) << 23;
  F32x16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// One KV head and `heads` query heads that share it (q and out: heads x hd, consecutive; scores: heads rows
// of n_keys). Each key and value row is read once for all the heads.
template <typename K, typename V>
void attend_group_typed(const float* q, int64_t heads, int64_t hd, const K* keys, int64_t k_stride, const V* values,
                        int64_t v_stride, int64_t n_keys, const KeyMask& mask, float scale, float* scores, float* out) {
  constexpr float kHidden = -std::numeric_limits<float>::infinity();
  const int64_t last = mask.last < n_keys - 1 ? mask.last : n_keys - 1;
  const int64_t n = last + 1;
  std::memset(out, 0, static_cast<size_t>(heads * hd) * sizeof(float));
  if (n <= 0) return;
  int64_t visible = 0;
  for (int64_t s = 0; s < n; ++s) {
    if (mask.allow != nullptr && mask.allow[s] == 0) {
      for (int64_t h = 0; h < heads; ++h) scores[h * n_keys + s] = kHidden;
      continue;
    }
    const K* k = keys + s * k_stride;
    const float add = mask.add != nullptr ? mask.add[s] : 0.0f;
    for (int64_t h = 0; h < heads; ++h) scores[h * n_keys + s] = dot(q + h * hd, k, hd) * scale + add;
    visible += add != kHidden;
  }
  if (visible == 0) return;  // no key to attend to: zeros, as for a padded query
  for (int64_t h = 0; h < heads; ++h) {
    float* row = scores + h * n_keys;
    float top = kHidden;
    for (int64_t s = 0; s < n; ++s) top = row[s] > top ? row[s] : top;  // NaN never wins; it stays in row
    if (top == kHidden) top = 0.0f;                                     // every visible score NaN
    float sum = 0.0f;
    int64_t s = 0;
    for (; s + 16 <= n; s += 16) {
      const F32x16 x = load16(row + s);
      F32x16 e = exp16(x - top);
      e = x == kHidden ? F32x16{} : e;
      store16(row + s, e);
      for (int j = 0; j < 16; ++j) sum += e[j];
    }
    for (; s < n; ++s) {
      row[s] = row[s] == kHidden ? 0.0f : std::exp(row[s] - top);
      sum += row[s];
    }
    const float inv = 1.0f / sum;  // a NaN score made sum NaN: every weight of the head is then NaN
    for (s = 0; s < n; ++s) row[s] *= inv;
  }
  for (int64_t s = 0; s < n; ++s) {
    const V* v = values + s * v_stride;
    for (int64_t h = 0; h < heads; ++h) {
      const float p = scores[h * n_keys + s];
      if (p != 0.0f) axpy(p, v, out + h * hd, hd);
    }
  }
}

inline void attend_group_any(const float* q, int64_t heads, int64_t hd, const KvRows& k, const KvRows& v,
                             int64_t n_keys, const KeyMask& mask, float scale, float* scores, float* out) {
  const auto* kf = static_cast<const float*>(k.data);
  const auto* kb = static_cast<const uint16_t*>(k.data);
  const auto* vf = static_cast<const float*>(v.data);
  const auto* vb = static_cast<const uint16_t*>(v.data);
  if (!k.bf16 && !v.bf16)
    return attend_group_typed(q, heads, hd, kf, k.stride, vf, v.stride, n_keys, mask, scale, scores, out);
  if (k.bf16 && v.bf16)
    return attend_group_typed(q, heads, hd, kb, k.stride, vb, v.stride, n_keys, mask, scale, scores, out);
  if (k.bf16) return attend_group_typed(q, heads, hd, kb, k.stride, vf, v.stride, n_keys, mask, scale, scores, out);
  attend_group_typed(q, heads, hd, kf, k.stride, vb, v.stride, n_keys, mask, scale, scores, out);
}

}  // namespace
}  // namespace ktinject
