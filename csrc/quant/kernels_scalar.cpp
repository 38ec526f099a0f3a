// Portable reference kernels: the definition every SIMD variant must agree with. Integer dot products
// are exact; only the float composition of scales is left to each variant's order.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "quant/act_format.h"
#include "quant/half.h"
#include "quant/isa_kernels.h"
#include "quant/q4_k.h"
#include "quant/q5_k.h"
#include "quant/q6_k.h"
#include "quant/q8_0.h"

namespace ktinject {
namespace {

int8_t quantize_one(float x, float id) {
  const float q = std::nearbyint(x * id);  // ties to even, like the SIMD cvtps
  return static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, q)));
}

void quantize_act_row(WeightType t, const float* x, int64_t cols, uint8_t* dst) {
  const ActLayout L = act_layout(t, cols);
  int8_t* qs = reinterpret_cast<int8_t*>(dst);
  switch (t) {
    case WeightType::Q4_K:
    case WeightType::Q5_K:
    case WeightType::Q6_K: {
      float* d = reinterpret_cast<float*>(dst + L.d_off);
      int16_t* bsum16 = reinterpret_cast<int16_t*>(dst + L.sum_off);
      int16_t* bsum32 = reinterpret_cast<int16_t*>(dst + L.sum32_off);
      for (int64_t sb = 0; sb < cols / 256; ++sb) {
        float amax = 0.0f;
        for (int i = 0; i < 256; ++i) amax = std::max(amax, std::fabs(x[256 * sb + i]));
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        d[sb] = amax / 127.0f;
        for (int i = 0; i < 256; ++i) qs[256 * sb + i] = quantize_one(x[256 * sb + i], id);
      }
      for (int64_t g = 0; g < cols / 16; ++g) {
        int s = 0;
        for (int i = 0; i < 16; ++i) s += qs[16 * g + i];
        bsum16[g] = static_cast<int16_t>(s);
      }
      for (int64_t g = 0; g < cols / 32; ++g) bsum32[g] = static_cast<int16_t>(bsum16[2 * g] + bsum16[2 * g + 1]);
      break;
    }
    case WeightType::Q8_0: {
      float* d = reinterpret_cast<float*>(dst + L.d_off);
      float* sum = reinterpret_cast<float*>(dst + L.sum_off);
      for (int64_t b = 0; b < cols / 32; ++b) {
        float amax = 0.0f;
        for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[32 * b + i]));
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        d[b] = amax / 127.0f;
        int s = 0;
        for (int i = 0; i < 32; ++i) {
          qs[32 * b + i] = quantize_one(x[32 * b + i], id);
          s += qs[32 * b + i];
        }
        sum[b] = d[b] * static_cast<float>(s);
      }
      break;
    }
    default:
      std::memcpy(dst, x, cols * sizeof(float));
      break;
  }
}

void quantize_act_scalar(WeightType t, const float* x, int64_t n_tokens, int64_t cols, uint8_t* dst) {
  const size_t stride = act_row_bytes(t, cols);
  for (int64_t tok = 0; tok < n_tokens; ++tok) quantize_act_row(t, x + tok * cols, cols, dst + tok * stride);
}

float dot_q4_k_q5_k(bool five, const uint8_t* w, int64_t cols, const uint8_t* act, const ActLayout& L) {
  const int8_t* a = reinterpret_cast<const int8_t*>(act);
  const float* ad = reinterpret_cast<const float*>(act + L.d_off);
  const int16_t* bsum32 = reinterpret_cast<const int16_t*>(act + L.sum32_off);
  const size_t bb = five ? sizeof(BlockQ5_K) : sizeof(BlockQ4_K);
  float sum = 0.0f;
  for (int64_t sb = 0; sb < cols / 256; ++sb) {
    const uint8_t* p = w + sb * bb;
    uint16_t d16, dmin16;
    std::memcpy(&d16, p, 2);
    std::memcpy(&dmin16, p + 2, 2);
    uint8_t sc[8], m[8];
    unpack_k_scales(p + 4, sc, m);
    const uint8_t* qh = p + 16;
    const uint8_t* qs = five ? p + 48 : p + 16;
    const int8_t* x = a + 256 * sb;
    int32_t isum = 0, msum = 0;
    for (int j = 0; j < 8; ++j) {
      int32_t s = 0;
      for (int l = 0; l < 32; ++l) {
        int q = (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 15;
        if (five) q |= ((qh[l] >> j) & 1) << 4;
        s += q * x[32 * j + l];
      }
      isum += sc[j] * s;
      msum += m[j] * bsum32[8 * sb + j];
    }
    sum += ad[sb] * (fp16_to_float(d16) * static_cast<float>(isum) - fp16_to_float(dmin16) * static_cast<float>(msum));
  }
  return sum;
}

float dot_q6_k(const uint8_t* w, int64_t cols, const uint8_t* act, const ActLayout& L) {
  const int8_t* a = reinterpret_cast<const int8_t*>(act);
  const float* ad = reinterpret_cast<const float*>(act + L.d_off);
  const int16_t* bsum16 = reinterpret_cast<const int16_t*>(act + L.sum_off);
  float sum = 0.0f;
  for (int64_t sb = 0; sb < cols / 256; ++sb) {
    BlockQ6_K b;
    std::memcpy(&b, w + sb * sizeof b, sizeof b);
    const int8_t* x = a + 256 * sb;
    int32_t isum = 0;
    for (int j = 0; j < 16; ++j) {
      int32_t s = 0;
      for (int i = 0; i < 16; ++i) {
        const int e = 16 * j + i, h = e / 128, r = e % 128;
        const int lo = (b.ql[64 * h + r % 64] >> (4 * (r / 64))) & 15;
        const int hi = (b.qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
        s += (lo | (hi << 4)) * x[e];
      }
      isum += b.scales[j] * (s - 32 * bsum16[16 * sb + j]);
    }
    sum += ad[sb] * fp16_to_float(b.d) * static_cast<float>(isum);
  }
  return sum;
}

float dot_q8_0(const uint8_t* w, int64_t cols, const uint8_t* act, const ActLayout& L) {
  const int8_t* a = reinterpret_cast<const int8_t*>(act);
  const float* ad = reinterpret_cast<const float*>(act + L.d_off);
  float sum = 0.0f;
  for (int64_t i = 0; i < cols / 32; ++i) {
    BlockQ8_0 b;
    std::memcpy(&b, w + i * sizeof b, sizeof b);
    int32_t s = 0;
    for (int l = 0; l < 32; ++l) s += b.qs[l] * a[32 * i + l];
    sum += fp16_to_float(b.d) * ad[i] * static_cast<float>(s);
  }
  return sum;
}

float dot_float(WeightType t, const uint8_t* w, int64_t cols, const float* x) {
  float acc[8] = {};
  for (int64_t i = 0; i < cols; ++i) {
    float v;
    if (t == WeightType::F32) {
      std::memcpy(&v, w + 4 * i, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, w + 2 * i, 2);
      v = t == WeightType::F16 ? fp16_to_float(h) : bf16_to_float(h);
    }
    acc[i % 8] += v * x[i];
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

void gemm_scalar(WeightType t, const uint8_t* W, int64_t row0, int64_t n_rows, int64_t cols, const uint8_t* act,
                 int64_t n_tokens, float* out, int64_t out_stride) {
  const size_t rb = row_bytes(t, cols);
  const ActLayout L = act_layout(t, cols);
  for (int64_t r = 0; r < n_rows; ++r) {
    const uint8_t* w = W + (row0 + r) * rb;
    for (int64_t tok = 0; tok < n_tokens; ++tok) {
      const uint8_t* a = act + tok * L.bytes;
      float v;
      switch (t) {
        case WeightType::Q4_K: v = dot_q4_k_q5_k(false, w, cols, a, L); break;
        case WeightType::Q5_K: v = dot_q4_k_q5_k(true, w, cols, a, L); break;
        case WeightType::Q6_K: v = dot_q6_k(w, cols, a, L); break;
        case WeightType::Q8_0: v = dot_q8_0(w, cols, a, L); break;
        default: v = dot_float(t, w, cols, reinterpret_cast<const float*>(a)); break;
      }
      out[tok * out_stride + r] = v;
    }
  }
}

}  // namespace

const IsaKernels& scalar_kernels() {
  static const IsaKernels k{quantize_act_scalar, gemm_scalar};
  return k;
}

}  // namespace ktinject
