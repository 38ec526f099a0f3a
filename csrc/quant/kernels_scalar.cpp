// Portable reference kernels: the definition every SIMD variant must agree with. They read the packed
// layout by unpacking one tile-block (16 GGUF blocks) at a time and then work on plain GGUF blocks, so
// they also pin down what packing means. Integer dot products are exact; only the float composition of
// scales may differ from a SIMD variant's rounding.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "quant/act_format.h"
#include "quant/act_quantize.h"
#include "quant/activation_impl.h"
#include "quant/half.h"
#include "quant/isa_kernels.h"
#include "quant/packed_format.h"
#include "quant/q4_k.h"
#include "quant/q5_k.h"
#include "quant/q6_k.h"
#include "quant/q8_0.h"

namespace ktinject {
namespace {

struct ActOps {
  static float max_abs(const float* x, int n) {
    float amax = 0.0f;
    for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
    return amax;
  }
  static int quantize16(const float* x, float inv, int8_t* q) {
    int sum = 0;
    for (int i = 0; i < 16; ++i) {
      const float v = std::nearbyint(x[i] * inv);  // ties to even, like the SIMD conversions
      q[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, v)));
      sum += q[i];
    }
    return sum;
  }
};

void quantize_act_cols_scalar(WeightType t, const float* x, int64_t cols, int64_t col0, int64_t ncols, uint8_t* row) {
  quantize_act_cols_with(ActOps{}, t, x, cols, col0, ncols, row);
}

// ---- one GGUF block against one activation block -----------------------------------------------------

struct ActRef {  // the parts of one activation row
  const int8_t* qs;
  const float* d;
  const int16_t* bsum16;
  const int16_t* bsum32;
  const float* f;
};

ActRef act_ref(WeightType t, const uint8_t* row, int64_t cols) {
  const ActLayout L = act_layout(t, cols);
  return {reinterpret_cast<const int8_t*>(row), reinterpret_cast<const float*>(row + L.d_off),
          reinterpret_cast<const int16_t*>(row + L.sum_off), reinterpret_cast<const int16_t*>(row + L.sum32_off),
          reinterpret_cast<const float*>(row)};
}

float block_q45_k(bool five, const uint8_t* p, const ActRef& a, int64_t sb) {
  uint16_t d16, dmin16;
  std::memcpy(&d16, p, 2);
  std::memcpy(&dmin16, p + 2, 2);
  uint8_t sc[8], m[8];
  unpack_k_scales(p + 4, sc, m);
  const uint8_t* qh = p + 16;
  const uint8_t* qs = five ? p + 48 : p + 16;
  const int8_t* x = a.qs + 256 * sb;
  int32_t isum = 0, msum = 0;
  for (int j = 0; j < 8; ++j) {
    int32_t s = 0;
    for (int l = 0; l < 32; ++l) {
      int q = (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 15;
      if (five) q |= ((qh[l] >> j) & 1) << 4;
      s += q * x[32 * j + l];
    }
    isum += sc[j] * s;
    msum += m[j] * a.bsum32[8 * sb + j];
  }
  return a.d[sb] * (fp16_to_float(d16) * static_cast<float>(isum) - fp16_to_float(dmin16) * static_cast<float>(msum));
}

float block_q6_k(const uint8_t* p, const ActRef& a, int64_t sb) {
  BlockQ6_K b;
  std::memcpy(&b, p, sizeof b);
  const int8_t* x = a.qs + 256 * sb;
  int32_t isum = 0;
  for (int j = 0; j < 16; ++j) {
    int32_t s = 0;
    for (int i = 0; i < 16; ++i) {
      const int e = 16 * j + i, h = e / 128, r = e % 128;
      const int lo = (b.ql[64 * h + r % 64] >> (4 * (r / 64))) & 15;
      const int hi = (b.qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
      s += (lo | (hi << 4)) * x[e];
    }
    isum += b.scales[j] * (s - 32 * a.bsum16[16 * sb + j]);
  }
  return a.d[sb] * fp16_to_float(b.d) * static_cast<float>(isum);
}

float block_q8_0(const uint8_t* p, const ActRef& a, int64_t blk) {
  BlockQ8_0 b;
  std::memcpy(&b, p, sizeof b);
  int32_t s = 0;
  for (int l = 0; l < 32; ++l) s += b.qs[l] * a.qs[32 * blk + l];
  return fp16_to_float(b.d) * a.d[blk] * static_cast<float>(s);
}

float group_float(WeightType t, const uint8_t* p, const ActRef& a, int64_t g) {
  if (t == WeightType::F32) {
    float w;
    std::memcpy(&w, p, 4);
    return w * a.f[g];
  }
  uint16_t h[2];
  std::memcpy(h, p, 4);
  const float w0 = t == WeightType::F16 ? fp16_to_float(h[0]) : bf16_to_float(h[0]);
  const float w1 = t == WeightType::F16 ? fp16_to_float(h[1]) : bf16_to_float(h[1]);
  return w0 * a.f[2 * g] + w1 * a.f[2 * g + 1];
}

// One dot product per type; no default, so -Wswitch names a type added without one.
float group_dot(WeightType t, const uint8_t* blk, const ActRef& a, int64_t g) {
  switch (t) {
    case WeightType::Q4_K:
      return block_q45_k(false, blk, a, g);
    case WeightType::Q5_K:
      return block_q45_k(true, blk, a, g);
    case WeightType::Q6_K:
      return block_q6_k(blk, a, g);
    case WeightType::Q8_0:
      return block_q8_0(blk, a, g);
    case WeightType::F32:
    case WeightType::F16:
    case WeightType::BF16:
      break;
  }
  return group_float(t, blk, a, g);
}

constexpr int kTokenGroup = 8;

void gemm_scalar(WeightType t, const uint8_t* packed, int64_t rows, int64_t cols, int64_t tile0, int64_t n_tiles,
                 const uint8_t* const* act, int64_t n_tokens, const GemmOut& out) {
  const PackedFormat f = packed_format(t);
  const int64_t groups = cols / f.group_cols;
  const size_t main = tile_main_bytes(f);
  const size_t tb = tile_bytes(t, cols);
  uint8_t blocks[kTileRows][256];  // one tile-block back in GGUF layout
  static_assert(max_group_bytes() <= 256, "a type's group outgrows the scalar kernel's block buffer");
  for (int64_t tile = tile0; tile < tile0 + n_tiles; ++tile) {
    const uint8_t* tp = packed + tile * tb;
    const int valid = static_cast<int>(std::min<int64_t>(kTileRows, rows - tile * kTileRows));
    for (int64_t i0 = 0; i0 < n_tokens; i0 += kTokenGroup) {
      const int nt = static_cast<int>(std::min<int64_t>(kTokenGroup, n_tokens - i0));
      ActRef refs[kTokenGroup];
      for (int i = 0; i < nt; ++i) refs[i] = act_ref(t, act[i0 + i], cols);
      float acc[kTokenGroup][kTileRows] = {};
      for (int64_t g = 0; g < groups; ++g) {
        for (int r = 0; r < valid; ++r) {
          for (int v = 0; v < f.main_vectors; ++v) {
            std::memcpy(blocks[r] + f.main_off + 4 * v, tp + g * main + 64 * v + 4 * r, 4);
            if (f.flip_sign)
              for (int b = 0; b < 4; ++b) blocks[r][f.main_off + 4 * v + b] ^= 0x80;
          }
          if (f.tail_off >= 0) std::memcpy(blocks[r] + f.tail_off, tp + groups * main + 32 * g + 2 * r, 2);
        }
        for (int i = 0; i < nt; ++i)
          for (int r = 0; r < valid; ++r) acc[i][r] += group_dot(t, blocks[r], refs[i], g);
      }
      for (int i = 0; i < nt; ++i) {
        float* dst = out.rows[i0 + i] + out.col0 + (tile - tile0) * kTileRows;
        for (int r = 0; r < valid; ++r) {
          if (out.scale != nullptr) {
            dst[r] += out.scale[i0 + i] * acc[i][r];
          } else {
            dst[r] = acc[i][r];
          }
        }
      }
    }
  }
}

void activate_scalar(const ActParams& p, float* x, const float* up, int64_t n) { act_impl::activate(p, x, up, n); }

}  // namespace

const IsaKernels& scalar_kernels() {
  static const IsaKernels k{quantize_act_cols_scalar, gemm_scalar, activate_scalar};
  return k;
}

}  // namespace ktinject
