// The one definition of how an activation row is quantized (act_format.h): block scales, codes and the
// block sums the weight formats' offset terms need. Each ISA unit supplies only its two inner loops,
//   float max_abs(const float* x, int n)                    largest |x| of n floats (n a multiple of 16)
//   int quantize16(const float* x, float inv, int8_t* q)    16 codes clamp(round_half_even(x * inv), +-127),
//                                                           returns their sum
// so the bytes are identical on every ISA by construction. Internal linkage: each unit keeps its own copy.
//
// A block holding a NaN or an infinity gets the scale NaN (its codes do not matter): every dot product with it is
// NaN, so non-finite activations come out non-finite for that token, as with float weights, instead of
// being clamped into ordinary int8 codes.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "quant/act_format.h"

namespace ktinject {
namespace {

// True when x[0..n) has no NaN or infinity (exponent bits all ones). Integer bit tests, so the compiler
// vectorizes the loop with the unit's ISA flags.
inline bool all_finite(const float* x, int64_t n) {
  uint32_t non_finite = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof bits);
    non_finite |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
  }
  return non_finite == 0;
}

template <typename Ops>
void quantize_act_cols_with(const Ops& ops, WeightType t, const float* x, int64_t cols, int64_t col0, int64_t ncols,
                            uint8_t* row) {
  const ActFormat format = weight_traits(t).act;
  const ActLayout L = act_layout(format, cols);
  int8_t* qs = reinterpret_cast<int8_t*>(row);
  float* d = reinterpret_cast<float*>(row + L.d_off);
  switch (format) {
    case ActFormat::Int8x256: {
      int16_t* bsum16 = reinterpret_cast<int16_t*>(row + L.sum_off);
      int16_t* bsum32 = reinterpret_cast<int16_t*>(row + L.sum32_off);
      for (int64_t c = 0; c < ncols; c += 256) {
        const int64_t sb = (col0 + c) / 256;
        const bool finite = all_finite(x + c, 256);
        const float amax = finite ? ops.max_abs(x + c, 256) : 0.0f;
        d[sb] = finite ? act_scale(amax) : std::numeric_limits<float>::quiet_NaN();
        for (int g = 0; g < 16; ++g)
          bsum16[16 * sb + g] =
              static_cast<int16_t>(ops.quantize16(x + c + 16 * g, act_inv_scale(amax), qs + 256 * sb + 16 * g));
        for (int g = 0; g < 8; ++g)
          bsum32[8 * sb + g] = static_cast<int16_t>(bsum16[16 * sb + 2 * g] + bsum16[16 * sb + 2 * g + 1]);
      }
      return;
    }
    case ActFormat::Int8x32: {
      int32_t* nsum = reinterpret_cast<int32_t*>(row + L.sum_off);
      for (int64_t c = 0; c < ncols; c += 32) {
        const int64_t b = (col0 + c) / 32;
        const bool finite = all_finite(x + c, 32);
        const float amax = finite ? ops.max_abs(x + c, 32) : 0.0f;
        const float inv = act_inv_scale(amax);
        d[b] = finite ? act_scale(amax) : std::numeric_limits<float>::quiet_NaN();
        nsum[b] = -128 * (ops.quantize16(x + c, inv, qs + 32 * b) + ops.quantize16(x + c + 16, inv, qs + 32 * b + 16));
      }
      return;
    }
    case ActFormat::F32:
      std::memcpy(reinterpret_cast<float*>(row) + col0, x, ncols * sizeof(float));
      return;
  }
}

}  // namespace
}  // namespace ktinject
