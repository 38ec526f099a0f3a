// The experts' activations (kernels.h Activation) as branch-free float loops. Included by each ISA translation unit,
// whose target flags let the compiler vectorize them (16 / 8 / 4 lanes); libm's expf/erff would not vectorize. Every
// function has internal linkage (static): each ISA unit keeps its own copy, so the linker can never pick an
// AVX-512-compiled copy for a caller on a CPU without AVX-512. Accuracy: exp to ~2 ulp-ish (relative 2e-7), erf
// to 1.5e-7 absolute; enough for float32 inference.
#pragma once

#include <cstdint>
#include <cstring>

#include "quant/kernels.h"

namespace ktinject {
namespace act_impl {

static inline float bits_as_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}

// e^x, x clamped to [-87.3, 88.3] (results stay normal and finite).
static inline float fast_exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * bits_as_float((static_cast<int32_t>(n) + 127) << 23);
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }

// Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), made odd.
static inline float fast_erf(float x) {
  const float a = x < 0 ? -x : x;
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float y = 1.0f - p * t * fast_exp(-a * a);
  return x < 0 ? -y : y;
}

static inline float fast_tanh(float x) { return 1.0f - 2.0f / (1.0f + fast_exp(2.0f * x)); }

static inline float silu(float x) { return x * sigmoid(x); }
static inline float clamp(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

// The elementwise kinds, one loop each so every loop vectorizes (a switch inside the loop would not).
template <typename F>
static inline void gated_loop(float* __restrict g, const float* __restrict up, int64_t n, F f) {
  for (int64_t i = 0; i < n; ++i) g[i] = f(g[i]) * up[i];
}
template <typename F>
static inline void single_loop(float* __restrict x, int64_t n, F f) {
  for (int64_t i = 0; i < n; ++i) x[i] = f(x[i]);
}

template <typename Loop>
static inline bool elementwise(Activation a, Loop loop) {
  switch (a) {
    case Activation::Silu:
      loop([](float v) { return silu(v); });
      return true;
    case Activation::Gelu:
      loop([](float v) { return 0.5f * v * (1.0f + fast_erf(v * 0.70710678118654752f)); });
      return true;
    case Activation::GeluTanh:
      loop([](float v) { return 0.5f * v * (1.0f + fast_tanh(0.7978845608028654f * (v + 0.044715f * v * v * v))); });
      return true;
    case Activation::Relu:
      loop([](float v) { return v > 0.0f ? v : 0.0f; });
      return true;
    case Activation::Relu2:
      loop([](float v) { return v > 0.0f ? v * v : 0.0f; });
      return true;
    case Activation::QuickGelu:
      loop([](float v) { return v * sigmoid(1.702f * v); });
      return true;
    default:
      return false;
  }
}

static inline void activate(const ActParams& p, float* __restrict x, const float* __restrict up, int64_t n) {
  if (!p.gated) {
    elementwise(p.kind, [&](auto f) { single_loop(x, n, f); });
    return;
  }
  if (elementwise(p.kind, [&](auto f) { gated_loop(x, up, n, f); })) return;
  const float limit = p.limit, alpha = p.alpha;
  switch (p.kind) {
    case Activation::GptOssSwiglu:
      for (int64_t i = 0; i < n; ++i) {
        const float g = x[i] < limit ? x[i] : limit;
        x[i] = (clamp(up[i], -limit, limit) + 1.0f) * (g * sigmoid(alpha * g));
      }
      return;
    case Activation::ClampedSwiglu:
      for (int64_t i = 0; i < n; ++i) x[i] = silu(x[i] < limit ? x[i] : limit) * clamp(up[i], -limit, limit);
      return;
    case Activation::SwigluClampAfter:
      for (int64_t i = 0; i < n; ++i) {
        const float s = silu(x[i]);
        x[i] = (s < limit ? s : limit) * clamp(up[i], -limit, limit);
      }
      return;
    case Activation::SoftcappedSwiglu: {
      const float sg = p.softcap_gate, su = p.softcap_up, inv_g = 1.0f / sg, inv_u = 1.0f / su;
      for (int64_t i = 0; i < n; ++i)
        x[i] = sg * fast_tanh(x[i] * inv_g) * sigmoid(x[i]) * (su * fast_tanh(up[i] * inv_u));
      return;
    }
    default:
      return;
  }
}

}  // namespace act_impl
}  // namespace ktinject
