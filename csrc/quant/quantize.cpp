// Float -> GGUF block quantizers (run once at load, so plain scalar code) and bit-exact dequantization.
// Compiled with -ffp-contract=off: dequantize_row must round exactly like gguf-py's numpy code
// (separate multiply and subtract, no fused multiply-add).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "quant/half.h"
#include "quant/kernels.h"
#include "quant/q4_k.h"
#include "quant/q5_k.h"
#include "quant/q6_k.h"
#include "quant/q8_0.h"

namespace ktinject {
namespace {

int clamp_int(int v, int lo, int hi) { return std::min(hi, std::max(lo, v)); }

// Least-squares fit of x ~= scale * q - min over one sub-block, q in [0, nmax], min >= 0. Tries a few
// grid scalings around the full range, refits scale/min to the chosen codes, keeps the lowest error.
void fit_scale_min(const float* x, int n, int nmax, float* scale, float* min) {
  float lo = 0.0f, hi = x[0];
  for (int i = 0; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  if (!(hi > lo)) {  // constant non-positive block
    *scale = 0.0f;
    *min = -lo;
    return;
  }
  float best_a = (hi - lo) / nmax, best_b = lo;
  double best_err = 0.0;
  for (int i = 0; i < n; ++i) {
    const int q = clamp_int(static_cast<int>(std::nearbyint((x[i] - lo) / best_a)), 0, nmax);
    const double e = best_a * q + best_b - x[i];
    best_err += e * e;
  }
  int q[256];
  for (int step = -10; step <= 10; ++step) {
    const float iscale = (nmax + 0.1f * step) / (hi - lo);
    double sq = 0, sqq = 0, sx = 0, sqx = 0;
    for (int i = 0; i < n; ++i) {
      q[i] = clamp_int(static_cast<int>(std::nearbyint((x[i] - lo) * iscale)), 0, nmax);
      sq += q[i];
      sqq += static_cast<double>(q[i]) * q[i];
      sx += x[i];
      sqx += q[i] * static_cast<double>(x[i]);
    }
    const double det = n * sqq - sq * sq;
    if (det <= 0) continue;
    double a = (n * sqx - sq * sx) / det;
    double b = (sqq * sx - sq * sqx) / det;
    if (b > 0) {  // the format can only subtract a min
      b = 0;
      a = sqx / sqq;
    }
    if (a <= 0) continue;
    double err = 0;
    for (int i = 0; i < n; ++i) {
      const double e = a * q[i] + b - x[i];
      err += e * e;
    }
    if (err < best_err) {
      best_err = err;
      best_a = static_cast<float>(a);
      best_b = static_cast<float>(b);
    }
  }
  *scale = best_a;
  *min = -best_b;
}

// Q4_K / Q5_K share everything except the code width and where the fifth bit goes.
void quantize_k_superblock(const float* x, int nmax, uint16_t* d_out, uint16_t* dmin_out, uint8_t* scales_out,
                           uint8_t* codes /* 256 values in [0, nmax] */) {
  float scale[8], min[8];
  float max_scale = 0.0f, max_min = 0.0f;
  for (int j = 0; j < 8; ++j) {
    fit_scale_min(x + 32 * j, 32, nmax, &scale[j], &min[j]);
    max_scale = std::max(max_scale, scale[j]);
    max_min = std::max(max_min, min[j]);
  }
  const uint16_t d16 = float_to_fp16(max_scale / 63.0f);
  const uint16_t dmin16 = float_to_fp16(max_min / 63.0f);
  const float d = fp16_to_float(d16), dmin = fp16_to_float(dmin16);
  uint8_t sc[8], m[8];
  for (int j = 0; j < 8; ++j) {
    sc[j] = static_cast<uint8_t>(d > 0 ? clamp_int(static_cast<int>(std::nearbyint(scale[j] / d)), 0, 63) : 0);
    m[j] = static_cast<uint8_t>(dmin > 0 ? clamp_int(static_cast<int>(std::nearbyint(min[j] / dmin)), 0, 63) : 0);
  }
  for (int j = 0; j < 8; ++j) {
    const float s = d * sc[j], mn = dmin * m[j];
    for (int i = 0; i < 32; ++i) {
      const int q = s > 0 ? static_cast<int>(std::nearbyint((x[32 * j + i] + mn) / s)) : 0;
      codes[32 * j + i] = static_cast<uint8_t>(clamp_int(q, 0, nmax));
    }
  }
  *d_out = d16;
  *dmin_out = dmin16;
  pack_k_scales(sc, m, scales_out);
}

void quantize_q4_k(const float* x, BlockQ4_K* b) {
  uint8_t codes[256];
  quantize_k_superblock(x, 15, &b->d, &b->dmin, b->scales, codes);
  for (int g = 0; g < 4; ++g)
    for (int l = 0; l < 32; ++l)
      b->qs[32 * g + l] = static_cast<uint8_t>(codes[64 * g + l] | (codes[64 * g + 32 + l] << 4));
}

void quantize_q5_k(const float* x, BlockQ5_K* b) {
  uint8_t codes[256];
  quantize_k_superblock(x, 31, &b->d, &b->dmin, b->scales, codes);
  std::memset(b->qh, 0, sizeof b->qh);
  for (int g = 0; g < 4; ++g)
    for (int l = 0; l < 32; ++l)
      b->qs[32 * g + l] = static_cast<uint8_t>((codes[64 * g + l] & 15) | ((codes[64 * g + 32 + l] & 15) << 4));
  for (int j = 0; j < 8; ++j)
    for (int l = 0; l < 32; ++l) b->qh[l] |= static_cast<uint8_t>((codes[32 * j + l] >> 4) << j);
}

// Symmetric fit x ~= scale * q, q in [-32, 31]; the largest-magnitude value may use the -32 side.
float fit_scale_q6(const float* x, int n) {
  float vmax = 0.0f;
  for (int i = 0; i < n; ++i)
    if (std::fabs(x[i]) > std::fabs(vmax)) vmax = x[i];
  if (vmax == 0.0f) return 0.0f;
  float best = vmax / -32.0f;
  double best_err = -1;
  for (int step = -10; step <= 10; ++step) {
    const float iscale = -(32.0f + 0.1f * step) / vmax;
    double sqq = 0, sqx = 0;
    int q[16];
    for (int i = 0; i < n; ++i) {
      q[i] = clamp_int(static_cast<int>(std::nearbyint(x[i] * iscale)), -32, 31);
      sqq += static_cast<double>(q[i]) * q[i];
      sqx += q[i] * static_cast<double>(x[i]);
    }
    if (sqq <= 0) continue;
    const double a = sqx / sqq;
    double err = 0;
    for (int i = 0; i < n; ++i) {
      const double e = a * q[i] - x[i];
      err += e * e;
    }
    if (best_err < 0 || err < best_err) {
      best_err = err;
      best = static_cast<float>(a);
    }
  }
  return best;
}

void quantize_q6_k(const float* x, BlockQ6_K* b) {
  float scale[16];
  float max_abs = 0.0f;
  for (int j = 0; j < 16; ++j) {
    scale[j] = fit_scale_q6(x + 16 * j, 16);
    max_abs = std::max(max_abs, std::fabs(scale[j]));
  }
  const uint16_t d16 = float_to_fp16(max_abs / 127.0f);
  const float d = fp16_to_float(d16);
  uint8_t codes[256];
  for (int j = 0; j < 16; ++j) {
    const int sc = d > 0 ? clamp_int(static_cast<int>(std::nearbyint(scale[j] / d)), -128, 127) : 0;
    b->scales[j] = static_cast<int8_t>(sc);
    const float s = d * sc;
    for (int i = 0; i < 16; ++i) {
      const int q = s != 0 ? clamp_int(static_cast<int>(std::nearbyint(x[16 * j + i] / s)), -32, 31) : 0;
      codes[16 * j + i] = static_cast<uint8_t>(q + 32);
    }
  }
  b->d = d16;
  std::memset(b->ql, 0, sizeof b->ql);
  std::memset(b->qh, 0, sizeof b->qh);
  for (int h = 0; h < 2; ++h)
    for (int r = 0; r < 128; ++r) {
      const uint8_t c = codes[128 * h + r];
      b->ql[64 * h + r % 64] |= static_cast<uint8_t>((c & 15) << (4 * (r / 64)));
      b->qh[32 * h + r % 32] |= static_cast<uint8_t>((c >> 4) << (2 * (r / 32)));
    }
}

// Same arithmetic as gguf-py's Q8_0.quantize_blocks (and ggml's reference), so the bytes match.
void quantize_q8_0(const float* x, BlockQ8_0* b) {
  float amax = 0.0f;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  for (int i = 0; i < 32; ++i) b->qs[i] = static_cast<int8_t>(std::round(x[i] * id));
  b->d = float_to_fp16(d);
}

}  // namespace

// quantize_weights and dequantize_row: one case per type and no default, so -Wswitch names a type added
// without its code.
void quantize_weights(WeightType t, const float* src, int64_t n_rows, int64_t cols, uint8_t* dst) {
  const size_t rb = row_bytes(t, cols);
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* x = src + r * cols;
    uint8_t* out = dst + r * rb;
    switch (t) {
      case WeightType::F32:
        std::memcpy(out, x, cols * sizeof(float));
        break;
      case WeightType::F16:
        for (int64_t i = 0; i < cols; ++i) {
          const uint16_t h = float_to_fp16(x[i]);
          std::memcpy(out + 2 * i, &h, 2);
        }
        break;
      case WeightType::BF16:
        for (int64_t i = 0; i < cols; ++i) {
          const uint16_t h = float_to_bf16(x[i]);
          std::memcpy(out + 2 * i, &h, 2);
        }
        break;
      case WeightType::Q8_0:
        for (int64_t i = 0; i < cols / 32; ++i) quantize_q8_0(x + 32 * i, reinterpret_cast<BlockQ8_0*>(out) + i);
        break;
      case WeightType::Q4_K:
        for (int64_t i = 0; i < cols / 256; ++i) quantize_q4_k(x + 256 * i, reinterpret_cast<BlockQ4_K*>(out) + i);
        break;
      case WeightType::Q5_K:
        for (int64_t i = 0; i < cols / 256; ++i) quantize_q5_k(x + 256 * i, reinterpret_cast<BlockQ5_K*>(out) + i);
        break;
      case WeightType::Q6_K:
        for (int64_t i = 0; i < cols / 256; ++i) quantize_q6_k(x + 256 * i, reinterpret_cast<BlockQ6_K*>(out) + i);
        break;
    }
  }
}

void dequantize_row(WeightType t, const uint8_t* src, int64_t cols, float* dst) {
  switch (t) {
    case WeightType::F32:
      std::memcpy(dst, src, cols * sizeof(float));
      return;
    case WeightType::F16:
    case WeightType::BF16:
      for (int64_t i = 0; i < cols; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = t == WeightType::F16 ? fp16_to_float(h) : bf16_to_float(h);
      }
      return;
    case WeightType::Q8_0:
      for (int64_t i = 0; i < cols / 32; ++i) {
        BlockQ8_0 b;
        std::memcpy(&b, src + i * sizeof b, sizeof b);
        const float d = fp16_to_float(b.d);
        for (int l = 0; l < 32; ++l) dst[32 * i + l] = static_cast<float>(b.qs[l]) * d;
      }
      return;
    case WeightType::Q4_K:
    case WeightType::Q5_K:
      for (int64_t i = 0; i < cols / 256; ++i) {
        const bool five = t == WeightType::Q5_K;
        const uint8_t* p = src + i * block_bytes(t);
        uint16_t d16, dmin16;
        std::memcpy(&d16, p, 2);
        std::memcpy(&dmin16, p + 2, 2);
        const uint8_t* qh = p + 16;
        const uint8_t* qs = five ? p + 48 : p + 16;
        uint8_t sc[8], m[8];
        unpack_k_scales(p + 4, sc, m);
        const float d = fp16_to_float(d16), dmin = fp16_to_float(dmin16);
        float* y = dst + 256 * i;
        for (int j = 0; j < 8; ++j) {
          const float dj = d * static_cast<float>(sc[j]);
          const float mj = dmin * static_cast<float>(m[j]);
          for (int l = 0; l < 32; ++l) {
            int q = (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 15;
            if (five) q |= ((qh[l] >> j) & 1) << 4;
            y[32 * j + l] = dj * static_cast<float>(q) - mj;
          }
        }
      }
      return;
    case WeightType::Q6_K:
      for (int64_t i = 0; i < cols / 256; ++i) {
        BlockQ6_K b;
        std::memcpy(&b, src + i * sizeof b, sizeof b);
        const float d = fp16_to_float(b.d);
        float* y = dst + 256 * i;
        for (int h = 0; h < 2; ++h)
          for (int r = 0; r < 128; ++r) {
            const int lo = (b.ql[64 * h + r % 64] >> (4 * (r / 64))) & 15;
            const int hi = (b.qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
            const float dj = d * static_cast<float>(b.scales[(128 * h + r) / 16]);
            y[128 * h + r] = dj * static_cast<float>((lo | (hi << 4)) - 32);
          }
      }
      return;
  }
}

}  // namespace ktinject
