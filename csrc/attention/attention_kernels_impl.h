// One source for every ISA build of attend_head (attention_kernels.h): GCC vector extensions of 16 floats,
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

template <typename K, typename V>
void attend_head_typed(const float* q, int64_t hd, const K* keys, int64_t k_stride, const V* values, int64_t v_stride,
                       int64_t n_keys, const KeyMask& mask, float scale, float* scores, float* out) {
  constexpr float kHidden = -std::numeric_limits<float>::infinity();
  const int64_t last = mask.last < n_keys - 1 ? mask.last : n_keys - 1;
  float top = kHidden;
  int64_t visible = 0;
  for (int64_t s = 0; s <= last; ++s) {
    if (mask.allow != nullptr && mask.allow[s] == 0) {
      scores[s] = kHidden;
      continue;
    }
    float x = dot(q, keys + s * k_stride, hd) * scale;
    if (mask.add != nullptr) x += mask.add[s];
    scores[s] = x;
    if (x != kHidden) ++visible;
    if (x > top) top = x;
  }
  std::memset(out, 0, static_cast<size_t>(hd) * sizeof(float));
  if (visible == 0) return;  // no key to attend to: zeros, as for a padded query
  float sum = 0.0f;
  for (int64_t s = 0; s <= last; ++s) {
    const float e = scores[s] == kHidden ? 0.0f : std::exp(scores[s] - top);  // NaN stays NaN
    scores[s] = e;
    sum += e;
  }
  const float inv = 1.0f / sum;
  for (int64_t s = 0; s <= last; ++s)
    if (scores[s] != 0.0f) axpy(scores[s] * inv, values + s * v_stride, out, hd);
}

inline void attend_head_any(const float* q, int64_t hd, const KvRows& k, const KvRows& v, int64_t n_keys,
                            const KeyMask& mask, float scale, float* scores, float* out) {
  const auto* kf = static_cast<const float*>(k.data);
  const auto* kb = static_cast<const uint16_t*>(k.data);
  const auto* vf = static_cast<const float*>(v.data);
  const auto* vb = static_cast<const uint16_t*>(v.data);
  if (!k.bf16 && !v.bf16) return attend_head_typed(q, hd, kf, k.stride, vf, v.stride, n_keys, mask, scale, scores, out);
  if (k.bf16 && v.bf16) return attend_head_typed(q, hd, kb, k.stride, vb, v.stride, n_keys, mask, scale, scores, out);
  if (k.bf16) return attend_head_typed(q, hd, kb, k.stride, vf, v.stride, n_keys, mask, scale, scores, out);
  attend_head_typed(q, hd, kf, k.stride, vb, v.stride, n_keys, mask, scale, scores, out);
}

}  // namespace
}  // namespace ktinject
