// Layout of one quantized activation row (what quantize_act writes and gemm reads); private to the
// kernel layer. Structure-of-arrays so that each part is a contiguous, 64-byte aligned vector load; one
// layout per ActFormat (the format a weight type reads is its `act` in kWeightTypes, weight_types.h):
//   Int8x256 (K-quants):        qs int8[cols] | d f32[cols/256] | bsum16 int16[cols/16] | bsum32 int16[cols/32]
//     x ~= d[sb] * qs; bsum16/bsum32 are sums of qs over each 16 / 32 elements (the weights' offset terms).
//   Int8x32 (Q8_0):             qs int8[cols] | d f32[cols/32] | nsum int32[cols/32]
//     x ~= d[b] * qs; nsum[b] = -128 * (sum of the block's qs): the packed weights are stored as
//     u8 = w + 128, so sum((w + 128) * q) + nsum = sum(w * q).
//   F32 (F32 / F16 / BF16):     f32[cols]
// Every part starts at a multiple of 64 bytes; the row is padded to a multiple of 64.
#pragma once

#include <cstddef>
#include <cstdint>

#include "quant/weight_types.h"

namespace ktinject {

// A block whose largest magnitude is at most this quantizes to zeros: 127 / amax would overflow a float
// (denormal activations are numerically zero anyway). Every ISA applies the same rule, so their bytes agree.
constexpr float kMinActAmax = 1e-30f;
static inline float act_inv_scale(float amax) { return amax > kMinActAmax ? 127.0f / amax : 0.0f; }
static inline float act_scale(float amax) { return amax > kMinActAmax ? amax / 127.0f : 0.0f; }

static inline size_t round_up_64(size_t n) { return (n + 63) & ~static_cast<size_t>(63); }

struct ActLayout {
  size_t d_off = 0;      // f32 scales
  size_t sum_off = 0;    // K-quants: int16 bsum16; Q8_0: int32 nsum
  size_t sum32_off = 0;  // K-quants: int16 bsum32
  size_t bytes = 0;      // whole row, multiple of 64
};

static inline ActLayout act_layout(ActFormat f, int64_t cols) {
  const size_t n = static_cast<size_t>(cols);
  ActLayout l;
  switch (f) {
    case ActFormat::Int8x256:
      l.d_off = round_up_64(n);
      l.sum_off = l.d_off + round_up_64(n / 256 * sizeof(float));
      l.sum32_off = l.sum_off + round_up_64(n / 16 * sizeof(int16_t));
      l.bytes = l.sum32_off + round_up_64(n / 32 * sizeof(int16_t));
      break;
    case ActFormat::Int8x32:
      l.d_off = round_up_64(n);
      l.sum_off = l.d_off + round_up_64(n / 32 * sizeof(float));
      l.bytes = l.sum_off + round_up_64(n / 32 * sizeof(int32_t));
      break;
    case ActFormat::F32:
      l.bytes = round_up_64(n * sizeof(float));
      break;
  }
  return l;
}

// The layout of the activation rows weight type t reads.
static inline ActLayout act_layout(WeightType t, int64_t cols) { return act_layout(weight_traits(t).act, cols); }

// A SIMD micro-kernel's view of its token group's activation rows (up to kMax rows), split into their parts.
template <int kMax>
struct ActRows {
  const int8_t* qs[kMax];
  const float* d[kMax];
  const int16_t* s16[kMax];  // K-quants: bsum16; Q8_0: nsum (read as int32)
  const int16_t* s32[kMax];  // K-quants: bsum32
  const float* f[kMax];      // float weight types: the f32 activations themselves
};

template <int kMax>
static inline ActRows<kMax> split_act_rows(WeightType t, const uint8_t* const* act, int n, int64_t cols) {
  const ActLayout L = act_layout(t, cols);
  ActRows<kMax> a{};
  for (int i = 0; i < n; ++i) {
    a.qs[i] = reinterpret_cast<const int8_t*>(act[i]);
    a.d[i] = reinterpret_cast<const float*>(act[i] + L.d_off);
    a.s16[i] = reinterpret_cast<const int16_t*>(act[i] + L.sum_off);
    a.s32[i] = reinterpret_cast<const int16_t*>(act[i] + L.sum32_off);
    a.f[i] = reinterpret_cast<const float*>(act[i]);
  }
  return a;
}

}  // namespace ktinject
