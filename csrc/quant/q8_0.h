// GGUF Q8_0: 32 weights per block, value = d * qs[i].
#pragma once

#include <cstdint>

namespace ktinject {

struct BlockQ8_0 {
  static constexpr int kElems = 32;
  uint16_t d;     // fp16 scale
  int8_t qs[32];  // element i
};
static_assert(sizeof(BlockQ8_0) == 34, "Q8_0 block is 34 bytes");

}  // namespace ktinject
