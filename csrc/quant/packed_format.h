// The packed weight layout every kernel reads (made by pack_tiles, undone by unpack_row).
//
// A matrix is cut into tiles of 16 rows. Within a tile, each GGUF block-column (the 16 blocks that
// cover the same columns in the 16 rows) becomes a "tile-block": the block's bytes [main_off,
// main_off + 4 * main_vectors) are transposed in 4-byte groups, so 64-byte vector v holds, in lane r
// (bytes 4r..4r+3), bytes [main_off + 4v, main_off + 4v + 4) of row r's block. One vector load then
// gives 4 bytes of each of 16 rows, a broadcast activation dword multiplies all 16 rows at once
// (vpdpbusd), and every accumulator lane belongs to one row: no horizontal sums.
// A 2-byte field outside the main range (the fp16 scale `d` of Q8_0 and Q6_K) goes to a tail after all
// main parts of the tile: 16 values (row order) per tile-block.
//
//   tile = [main(block 0) | main(block 1) | ... | tail(block 0) | tail(block 1) | ...]
//
// Per type (bytes of the GGUF block -> vectors of the main part):
//   Q4_K (144 B): v0 = d|dmin, v1..3 = the 12 scale bytes, v4..35 = qs            (no tail)
//   Q5_K (176 B): v0 = d|dmin, v1..3 = scales, v4..11 = qh, v12..43 = qs          (no tail)
//   Q6_K (210 B): v0..31 = ql, v32..47 = qh, v48..51 = scales                     tail: d
//   Q8_0 (34 B):  v0..7 = qs, each byte XOR 0x80 (u8 = q + 128, for u8 x s8 dot products)   tail: d
//   F32: one column per vector; F16/BF16: two columns per vector (lane r = cols 2c, 2c+1 of row r).
// The packed matrix takes exactly rows_padded * row_bytes bytes, like the GGUF matrix.
#pragma once

#include <cstddef>
#include <cstdint>

#include "quant/kernels.h"

namespace ktinject {

struct PackedFormat {
  int group_bytes;   // bytes of one row per tile-block (== block_bytes; 4 for float types)
  int main_off;      // first byte of the transposed range within the group
  int main_vectors;  // 64-byte vectors of the main part
  int tail_off;      // offset of the 2-byte tail field within the group, or -1
  bool flip_sign;    // Q8_0: codes stored XOR 0x80
};

static inline PackedFormat packed_format(WeightType t) {
  switch (t) {
    case WeightType::Q4_K: return {144, 0, 36, -1, false};
    case WeightType::Q5_K: return {176, 0, 44, -1, false};
    case WeightType::Q6_K: return {210, 0, 52, 208, false};
    case WeightType::Q8_0: return {34, 2, 8, 0, true};
    default: return {4, 0, 1, -1, false};  // F32 / F16 / BF16: 4 bytes of a row per group
  }
}

// Columns covered by one tile-block.
static inline int64_t group_cols(WeightType t) {
  switch (t) {
    case WeightType::F32: return 1;
    case WeightType::F16:
    case WeightType::BF16: return 2;
    default: return block_elems(t);
  }
}

static inline size_t tile_main_bytes(WeightType t) { return static_cast<size_t>(packed_format(t).main_vectors) * 64; }

}  // namespace ktinject
