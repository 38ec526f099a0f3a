// GGUF Q4_K: 256 weights per super-block in 8 sub-blocks of 32, value = d*sc[j]*q - dmin*m[j], q in [0, 15],
// sc/m 6-bit. Element 64*g + l (l < 32) is the low nibble of qs[32*g + l] (sub-block 2g); element
// 64*g + 32 + l is its high nibble (sub-block 2g+1).
#pragma once

#include <cstdint>

namespace ktinject {

struct BlockQ4_K {
  static constexpr int kElems = 256;
  uint16_t d;          // fp16 super-block scale of the sub-block scales
  uint16_t dmin;       // fp16 super-block scale of the sub-block mins
  uint8_t scales[12];  // 8 scales + 8 mins, 6 bits each, packed as in unpack_k_scales
  uint8_t qs[128];
};
static_assert(sizeof(BlockQ4_K) == 144, "Q4_K block is 144 bytes");

// The 12-byte packing shared by Q4_K and Q5_K. For j < 4: sc[j] = b[j] & 63, m[j] = b[j+4] & 63.
// For j >= 4: sc[j] = (b[j+4] & 15) | (b[j-4] >> 6) << 4, m[j] = (b[j+4] >> 4) | (b[j] >> 6) << 4.
static inline void unpack_k_scales(const uint8_t* b, uint8_t* sc, uint8_t* m) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = b[j] & 63;
    m[j] = b[j + 4] & 63;
    sc[j + 4] = static_cast<uint8_t>((b[j + 8] & 15) | ((b[j] >> 6) << 4));
    m[j + 4] = static_cast<uint8_t>((b[j + 8] >> 4) | ((b[j + 4] >> 6) << 4));
  }
}

// Inverse of unpack_k_scales; sc[j], m[j] < 64.
static inline void pack_k_scales(const uint8_t* sc, const uint8_t* m, uint8_t* b) {
  for (int j = 0; j < 4; ++j) {
    b[j] = static_cast<uint8_t>(sc[j] | ((sc[j + 4] >> 4) << 6));
    b[j + 4] = static_cast<uint8_t>(m[j] | ((m[j + 4] >> 4) << 6));
    b[j + 8] = static_cast<uint8_t>((sc[j + 4] & 15) | ((m[j + 4] & 15) << 4));
  }
}

}  // namespace ktinject
