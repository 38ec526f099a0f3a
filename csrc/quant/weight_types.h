// The CPU kernels' weight types and every fact about them, in one table (kWeightTypes). Code that needs a
// fact (sizes, the name, the activation format, the packing) reads it from here; code that differs per type
// (each ISA's dot products, the quantizers) dispatches with a switch that has no `default`, so -Wswitch
// names every switch a new WeightType is missing from.
//
// Adding a type: its enumerator (the GGML id), its block struct (q?_?.h), its row below; the compiler then
// points at each kernel switch that needs its code.
//
// Everything here is constexpr: with a constant type the compiler folds a fact to a number, with a
// variable one it is a load from the table. Functions are `static` (internal linkage) for the same reason
// as the other shared kernel headers: an ISA unit's copy must never be the one another unit calls.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iterator>

#include "quant/q4_k.h"
#include "quant/q5_k.h"
#include "quant/q6_k.h"
#include "quant/q8_0.h"

namespace ktinject {

// Values are the GGML type ids, so a GGUF tensor's type converts directly.
enum class WeightType : int { F32 = 0, F16 = 1, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };

// The activation row a type's dot product reads (byte layouts in act_format.h).
enum class ActFormat : int {
  F32,       // float weights: the f32 activations themselves
  Int8x32,   // Q8_0: int8 codes with one f32 scale and one int32 code sum per 32 elements
  Int8x256,  // K-quants: int8 codes with one f32 scale per 256 elements and int16 code sums per 16 and 32
};

// Elements per activation quantization block of a format.
static constexpr int act_format_block_elems(ActFormat f) {
  switch (f) {
    case ActFormat::F32:
      return 1;
    case ActFormat::Int8x32:
      return 32;
    case ActFormat::Int8x256:
      return 256;
  }
  return 0;
}

struct WeightTypeTraits {
  WeightType type = WeightType::F32;
  const char* name = nullptr;  // gguf-py's name, lower case
  int block_elems = 0;         // elements per GGUF block (1 for float types)
  int block_bytes = 0;         // bytes per GGUF block (float types: the element size)
  // A row's column count must be a multiple of this: the columns of one packed group, which holds 4 bytes
  // of each row at least (packed_format.h), so 2 for the 16-bit floats and the block size for block formats.
  int col_granularity = 0;
  ActFormat act = ActFormat::F32;  // what its dot product reads
  // Packing (packed_format.h): the offset of the 2-byte field that goes to the tile's tail (the fp16 scale
  // `d` of Q8_0 and Q6_K), or -1; and whether the codes are stored XOR 0x80 (Q8_0, for u8 x s8 products).
  int tail_off = -1;
  bool flip_sign = false;
};

// Float types first, then the block formats; the order supported_weight_types() and error messages list.
inline constexpr WeightTypeTraits kWeightTypes[] = {
    // type            name    block_elems        block_bytes        col_granularity    act  (then tail_off, flip_sign)
    {WeightType::F32, "f32", 1, sizeof(float), 1, ActFormat::F32},
    {WeightType::F16, "f16", 1, sizeof(uint16_t), 2, ActFormat::F32},
    {WeightType::BF16, "bf16", 1, sizeof(uint16_t), 2, ActFormat::F32},
    {WeightType::Q8_0, "q8_0", BlockQ8_0::kElems, sizeof(BlockQ8_0), BlockQ8_0::kElems, ActFormat::Int8x32,
     offsetof(BlockQ8_0, d), true},
    {WeightType::Q4_K, "q4_k", BlockQ4_K::kElems, sizeof(BlockQ4_K), BlockQ4_K::kElems, ActFormat::Int8x256},
    {WeightType::Q5_K, "q5_k", BlockQ5_K::kElems, sizeof(BlockQ5_K), BlockQ5_K::kElems, ActFormat::Int8x256},
    {WeightType::Q6_K, "q6_k", BlockQ6_K::kElems, sizeof(BlockQ6_K), BlockQ6_K::kElems, ActFormat::Int8x256,
     offsetof(BlockQ6_K, d)},
};

namespace weight_types_detail {

constexpr int max_id() {
  int m = 0;
  for (const WeightTypeTraits& w : kWeightTypes) m = static_cast<int>(w.type) > m ? static_cast<int>(w.type) : m;
  return m;
}

// GGML id -> row of kWeightTypes, -1 for ids that are not a kernel type.
struct RowOfId {
  int8_t row[max_id() + 1];
};

constexpr RowOfId make_row_of_id() {
  RowOfId r{};
  for (int8_t& x : r.row) x = -1;
  for (size_t i = 0; i < std::size(kWeightTypes); ++i)
    r.row[static_cast<int>(kWeightTypes[i].type)] = static_cast<int8_t>(i);
  return r;
}
inline constexpr RowOfId kRowOfId = make_row_of_id();

// What the kernels rely on, checked for every row: ids unique and non-negative; a group is whole blocks
// and whole activation blocks; the packed group is a 4-byte-aligned main part plus at most a 2-byte tail
// at its start or end.
constexpr bool rows_consistent() {
  int seen = 0;
  for (int i = 0; i <= max_id(); ++i) seen += kRowOfId.row[i] >= 0;
  if (seen != static_cast<int>(std::size(kWeightTypes))) return false;
  for (const WeightTypeTraits& w : kWeightTypes) {
    if (static_cast<int>(w.type) < 0 || w.name == nullptr || w.block_elems <= 0 || w.block_bytes <= 0) return false;
    if (w.col_granularity % w.block_elems != 0 || w.col_granularity % act_format_block_elems(w.act) != 0) return false;
    const int group = w.col_granularity / w.block_elems * w.block_bytes;
    const int tail = w.tail_off >= 0 ? 2 : 0;
    if ((group - tail) % 4 != 0 || !(w.tail_off == -1 || w.tail_off == 0 || w.tail_off == group - 2)) return false;
  }
  return true;
}
static_assert(rows_consistent(), "kWeightTypes: a duplicate id or a row whose sizes the packed layout cannot hold");

}  // namespace weight_types_detail

// True when type_id is one of the WeightType values.
static constexpr bool weight_type_supported(int type_id) {
  return type_id >= 0 && type_id <= weight_types_detail::max_id() && weight_types_detail::kRowOfId.row[type_id] >= 0;
}

// The row of t. Precondition: t is a WeightType value (weight_type_supported).
static constexpr const WeightTypeTraits& weight_traits(WeightType t) {
  return kWeightTypes[weight_types_detail::kRowOfId.row[static_cast<int>(t)]];
}

// "f32", "q4_k", ...; "unknown" for an id that is no WeightType.
static constexpr const char* weight_type_name(WeightType t) {
  return weight_type_supported(static_cast<int>(t)) ? weight_traits(t).name : "unknown";
}
static constexpr int block_elems(WeightType t) { return weight_traits(t).block_elems; }
static constexpr size_t block_bytes(WeightType t) { return static_cast<size_t>(weight_traits(t).block_bytes); }
static constexpr int col_granularity(WeightType t) { return weight_traits(t).col_granularity; }
// Elements per activation quantization block: 256 (K-quants), 32 (Q8_0), 1 (float types).
static constexpr int act_block_elems(WeightType t) { return act_format_block_elems(weight_traits(t).act); }
// Bytes of one weight row. Precondition: cols % col_granularity(t) == 0.
static constexpr size_t row_bytes(WeightType t, int64_t cols) {
  return static_cast<size_t>(cols / block_elems(t)) * block_bytes(t);
}

}  // namespace ktinject
