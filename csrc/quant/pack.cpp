// GGUF rows <-> the packed tile layout (packed_format.h). Runs once per weight at load time, split across
// the pool's threads by tile, so it is plain portable code.
#include <cstring>

#include "quant/kernels.h"
#include "quant/packed_format.h"

namespace ktinject {

size_t tile_bytes(WeightType t, int64_t cols) { return static_cast<size_t>(kTileRows) * row_bytes(t, cols); }

int64_t num_tiles(int64_t rows) { return (rows + kTileRows - 1) / kTileRows; }

size_t packed_bytes(WeightType t, int64_t rows, int64_t cols) {
  return static_cast<size_t>(num_tiles(rows)) * tile_bytes(t, cols);
}

void pack_tiles(WeightType t, const uint8_t* src, size_t src_stride, int64_t rows, int64_t cols, int64_t tile0,
                int64_t tile1, uint8_t* packed) {
  const PackedFormat f = packed_format(t);
  const int64_t groups = cols / f.group_cols;
  const size_t main = tile_main_bytes(f);
  const size_t tb = tile_bytes(t, cols);
  for (int64_t tile = tile0; tile < tile1; ++tile) {
    uint8_t* dst = packed + tile * tb;
    uint8_t* tail = dst + groups * main;
    for (int r = 0; r < kTileRows; ++r) {
      const int64_t row = tile * kTileRows + r;
      const uint8_t* s = row < rows ? src + row * src_stride : nullptr;
      for (int64_t g = 0; g < groups; ++g) {
        uint8_t* m = dst + g * main + 4 * r;
        if (s == nullptr) {  // padding row: zero blocks (a zero scale makes every value 0)
          for (int v = 0; v < f.main_vectors; ++v) std::memset(m + 64 * v, f.flip_sign ? 0x80 : 0, 4);
          if (f.tail_off >= 0) std::memset(tail + 32 * g + 2 * r, 0, 2);
          continue;
        }
        const uint8_t* blk = s + g * f.group_bytes;
        for (int v = 0; v < f.main_vectors; ++v) {
          std::memcpy(m + 64 * v, blk + f.main_off + 4 * v, 4);
          if (f.flip_sign)
            for (int b = 0; b < 4; ++b) m[64 * v + b] ^= 0x80;
        }
        if (f.tail_off >= 0) std::memcpy(tail + 32 * g + 2 * r, blk + f.tail_off, 2);
      }
    }
  }
}

void unpack_row(WeightType t, const uint8_t* packed, int64_t cols, int64_t row, uint8_t* dst) {
  const PackedFormat f = packed_format(t);
  const int64_t groups = cols / f.group_cols;
  const size_t main = tile_main_bytes(f);
  const uint8_t* tile = packed + (row / kTileRows) * tile_bytes(t, cols);
  const int r = static_cast<int>(row % kTileRows);
  const uint8_t* tail = tile + groups * main;
  for (int64_t g = 0; g < groups; ++g) {
    uint8_t* blk = dst + g * f.group_bytes;
    for (int v = 0; v < f.main_vectors; ++v) {
      std::memcpy(blk + f.main_off + 4 * v, tile + g * main + 64 * v + 4 * r, 4);
      if (f.flip_sign)
        for (int b = 0; b < 4; ++b) blk[f.main_off + 4 * v + b] ^= 0x80;
    }
    if (f.tail_off >= 0) std::memcpy(blk + f.tail_off, tail + 32 * g + 2 * r, 2);
  }
}

}  // namespace ktinject
