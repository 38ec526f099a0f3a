// The one definition of how an activation row is quantized (act_format.h): block scales, codes and the
// block sums the weight formats' offset terms need. Each ISA unit supplies only its two inner loops,
//   float max_abs(const float* x, int n)                    largest |x| of n floats (n a multiple of 16)
//   int quantize16(const float* x, float inv, int8_t* q)    16 codes clamp(round_half_even(x * inv), +-127),
//                                                           returns their sum
// so the bytes are identical on every ISA by construction. Internal linkage: each unit keeps its own copy.
#pragma once

#include <cstdint>
#include <cstring>

#include "quant/act_format.h"

namespace ktinject {
namespace {

template <typename Ops>
void quantize_act_cols_with(const Ops& ops, WeightType t, const float* x, int64_t cols, int64_t col0, int64_t ncols,
                            uint8_t* row) {
  const ActLayout L = act_layout(t, cols);
  int8_t* qs = reinterpret_cast<int8_t*>(row);
  float* d = reinterpret_cast<float*>(row + L.d_off);
  if (t == WeightType::Q4_K || t == WeightType::Q5_K || t == WeightType::Q6_K) {
    int16_t* bsum16 = reinterpret_cast<int16_t*>(row + L.sum_off);
    int16_t* bsum32 = reinterpret_cast<int16_t*>(row + L.sum32_off);
    for (int64_t c = 0; c < ncols; c += 256) {
      const int64_t sb = (col0 + c) / 256;
      const float amax = ops.max_abs(x + c, 256);
      d[sb] = act_scale(amax);
      for (int g = 0; g < 16; ++g)
        bsum16[16 * sb + g] = static_cast<int16_t>(ops.quantize16(x + c + 16 * g, act_inv_scale(amax), qs + 256 * sb + 16 * g));
      for (int g = 0; g < 8; ++g)
        bsum32[8 * sb + g] = static_cast<int16_t>(bsum16[16 * sb + 2 * g] + bsum16[16 * sb + 2 * g + 1]);
    }
  } else if (t == WeightType::Q8_0) {
    int32_t* nsum = reinterpret_cast<int32_t*>(row + L.sum_off);
    for (int64_t c = 0; c < ncols; c += 32) {
      const int64_t b = (col0 + c) / 32;
      const float amax = ops.max_abs(x + c, 32);
      const float inv = act_inv_scale(amax);
      d[b] = act_scale(amax);
      nsum[b] = -128 * (ops.quantize16(x + c, inv, qs + 32 * b) + ops.quantize16(x + c + 16, inv, qs + 32 * b + 16));
    }
  } else {
    std::memcpy(reinterpret_cast<float*>(row) + col0, x, ncols * sizeof(float));
  }
}

}  // namespace
}  // namespace ktinject
