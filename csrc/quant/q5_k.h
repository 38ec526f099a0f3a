// GGUF Q5_K: like Q4_K with a fifth bit per weight, q in [0, 31]. Bit j of qh[l] is the high bit of
// element 32*j + l; the low 4 bits are laid out as in Q4_K.
#pragma once

#include <cstdint>

#include "quant/q4_k.h"

namespace ktinject {

struct BlockQ5_K {
  static constexpr int kElems = 256;
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];  // packed as Q4_K (unpack_k_scales)
  uint8_t qh[32];
  uint8_t qs[128];
};
static_assert(sizeof(BlockQ5_K) == 176, "Q5_K block is 176 bytes");

}  // namespace ktinject
