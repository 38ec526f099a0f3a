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

#include "quant/weight_types.h"

namespace ktinject {

// One type's packing, derived from its row in kWeightTypes (weight_types.h): a group is one block-column
// (col_granularity columns of a row, whole blocks); its 2-byte tail field, if any, sits at the group's start
// or end and the rest is the main part.
struct PackedFormat {
  int64_t group_cols;  // columns covered by one tile-block (== col_granularity)
  int group_bytes;     // bytes of one row per tile-block (== block_bytes for block formats; 4 for float types)
  int main_off;        // first byte of the transposed range within the group
  int main_vectors;    // 64-byte vectors of the main part
  int tail_off;        // offset of the 2-byte tail field within the group, or -1
  bool flip_sign;      // Q8_0: codes stored XOR 0x80
};

static constexpr PackedFormat packed_format(WeightType t) {
  const WeightTypeTraits& w = weight_traits(t);
  const int group_bytes = w.col_granularity / w.block_elems * w.block_bytes;
  const int tail_bytes = w.tail_off >= 0 ? 2 : 0;
  return {w.col_granularity, group_bytes, w.tail_off == 0 ? tail_bytes : 0, (group_bytes - tail_bytes) / 4,
          w.tail_off,        w.flip_sign};
}

// Bytes of a tile-block's main part (16 rows' main ranges).
static constexpr size_t tile_main_bytes(const PackedFormat& f) { return static_cast<size_t>(f.main_vectors) * 64; }

// The largest group of any type: what a buffer holding one row's group (the scalar kernel's) must hold.
static constexpr int max_group_bytes() {
  int m = 0;
  for (const WeightTypeTraits& w : kWeightTypes) {
    const int g = packed_format(w.type).group_bytes;
    m = g > m ? g : m;
  }
  return m;
}

// The per-type list at the top of this file, as the table gives it.
static_assert(packed_format(WeightType::Q4_K).main_vectors == 36 && packed_format(WeightType::Q4_K).tail_off == -1);
static_assert(packed_format(WeightType::Q5_K).main_vectors == 44 && packed_format(WeightType::Q5_K).tail_off == -1);
static_assert(packed_format(WeightType::Q6_K).main_vectors == 52 && packed_format(WeightType::Q6_K).tail_off == 208);
static_assert(packed_format(WeightType::Q8_0).main_off == 2 && packed_format(WeightType::Q8_0).main_vectors == 8 &&
              packed_format(WeightType::Q8_0).tail_off == 0 && packed_format(WeightType::Q8_0).flip_sign);
static_assert(packed_format(WeightType::F32).group_cols == 1 && packed_format(WeightType::F16).group_cols == 2 &&
              packed_format(WeightType::BF16).group_bytes == 4 && packed_format(WeightType::BF16).main_vectors == 1);

}  // namespace ktinject
