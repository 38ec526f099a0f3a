// GGUF Q6_K: 256 weights in 16 sub-blocks of 16, value = d * scales[i/16] * (q - 32), q in [0, 63].
// For element 128*h + r (h < 2, r < 128): low 4 bits are (ql[64*h + r%64] >> (4*(r/64))) & 15,
// high 2 bits are (qh[32*h + r%32] >> (2*(r/32))) & 3.
#pragma once

#include <cstdint>

namespace ktinject {

struct BlockQ6_K {
  static constexpr int kElems = 256;
  uint8_t ql[128];
  uint8_t qh[64];
  int8_t scales[16];
  uint16_t d;  // fp16
};
static_assert(sizeof(BlockQ6_K) == 210, "Q6_K block is 210 bytes");

}  // namespace ktinject
