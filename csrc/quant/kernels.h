// Weight formats and kernels of the CPU MoE operator: one API over GGUF block formats (Q8_0, Q4_K,
// Q5_K, Q6_K) and float rows (F32, F16, BF16), with scalar / AVX2 / AVX-512 variants chosen at run time.
// The types themselves (ids, names, sizes) are the table in weight_types.h.
// Raw pointers and shapes only; the binding layer and the MoE driver validate arguments, so every
// function here states its preconditions instead of checking them.
//
// Weights are used in a *packed* form made once at load time (packed_format.h): the same bytes as the
// GGUF blocks, regrouped in tiles of 16 rows so one 64-byte vector holds 4 bytes of each of 16 rows.
// Packing is lossless (unpack_row gives the GGUF bytes back) and takes exactly as much memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "quant/weight_types.h"

namespace ktinject {

// Kernel families. Avx2 needs AVX2+FMA+F16C; Avx512 needs AVX-512 F/BW/VL/DQ + VNNI.
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// The experts' activations. Gated: h = act(gate) * up for the elementwise kinds, and the parameterised
//   GptOssSwiglu        h = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)
//   ClampedSwiglu       h = silu(min(gate, limit)) * clamp(up, -limit, limit)
//   SwigluClampAfter    h = min(silu(gate), limit) * clamp(up, -limit, limit)
//   SoftcappedSwiglu    h = cg * sigmoid(gate) * cu, cg = sg * tanh(gate / sg), cu = su * tanh(up / su)
// Not gated (one up projection): h = act(up) for the elementwise kinds.
enum class Activation : int {
  Silu = 0,
  Gelu = 1,
  GeluTanh = 2,
  Relu = 3,
  GptOssSwiglu = 4,
  Relu2 = 5,
  QuickGelu = 6,
  ClampedSwiglu = 7,
  SwigluClampAfter = 8,
  SoftcappedSwiglu = 9,
};
// True for the kinds defined on one input (usable without a gate).
bool activation_is_elementwise(Activation a);

struct ActParams {
  Activation kind = Activation::Silu;
  bool gated = true;
  float alpha = 1.702f;       // GptOssSwiglu
  float limit = 7.0f;         // GptOssSwiglu, ClampedSwiglu, SwigluClampAfter
  float softcap_gate = 0.0f;  // SoftcappedSwiglu
  float softcap_up = 0.0f;
};

constexpr int kTileRows = 16;

// The weight types and their facts (weight_type_supported, weight_type_name, block_elems, block_bytes,
// col_granularity, act_block_elems, row_bytes) are in weight_types.h.

// Best kernel family of this CPU. KTINJECT_ISA=scalar|avx2|avx512 forces a lower one; naming one the
// CPU (or this build) lacks, or an unknown name, throws std::invalid_argument.
Isa best_isa();
// "scalar" | "avx2" | "avx512" -> Isa; throws std::invalid_argument on an unknown name or an ISA
// this CPU/build cannot run.
Isa parse_isa(const std::string& name);
const char* isa_name(Isa isa);
// True when this CPU and build can run kernels of `isa`.
bool isa_available(Isa isa);

// ---- packed weights -------------------------------------------------------------------------------
// Tiles of kTileRows rows; the last tile of a matrix whose row count is not a multiple is zero-padded.
size_t tile_bytes(WeightType t, int64_t cols);  // == kTileRows * row_bytes(t, cols)
int64_t num_tiles(int64_t rows);
size_t packed_bytes(WeightType t, int64_t rows, int64_t cols);
// Packs tiles [tile0, tile1) of a `rows` x `cols` GGUF matrix whose row r starts at src + r * src_stride
// (src_stride >= row_bytes(t, cols): a column slice of a wider matrix packs by pointing src at the
// slice's first block). `packed` points at the start of the whole packed matrix.
void pack_tiles(WeightType t, const uint8_t* src, size_t src_stride, int64_t rows, int64_t cols, int64_t tile0,
                int64_t tile1, uint8_t* packed);
// Writes row `row` of a packed matrix back in GGUF layout (row_bytes(t, cols) bytes).
void unpack_row(WeightType t, const uint8_t* packed, int64_t cols, int64_t row, uint8_t* dst);

// ---- activations ----------------------------------------------------------------------------------
// Activations are converted into the form a weight type's dot product reads (act_format.h): int8 with
// one f32 scale per 256 elements (K-quants) or per 32 (Q8_0), f32 for float types. Identical bytes for
// every Isa. Rows are act_row_bytes(t, cols) long (a multiple of 64).
size_t act_row_bytes(WeightType t, int64_t cols);
// Converts columns [col0, col0 + ncols) of one row: x holds those ncols values, `row` is the whole
// destination row (of `cols` columns). Preconditions: isa_available(isa); col0 and ncols multiples of
// act_block_elems(t) (ncols may end at cols); x finite for a meaningful result (never a crash).
void quantize_act_cols(Isa isa, WeightType t, const float* x, int64_t cols, int64_t col0, int64_t ncols, uint8_t* row);

// ---- gemm -----------------------------------------------------------------------------------------
// Where gemm writes: value of weight row (16 * tile + r) for token i goes to
// rows[i][col0 + 16 * (tile - tile0) + r]; stored when scale is null, else accumulated as
// rows[i][...] += scale[i] * value (tokens are processed in order, so two tokens may share a row).
struct GemmOut {
  float* const* rows;
  int64_t col0;
  const float* scale;
};

// out = W[tiles tile0 .. tile0+n_tiles) . act[i] for i < n_tokens. Only rows < `rows` are written.
// act[i] points at a row written by quantize_act_cols for the same t and cols.
// Single-threaded: callers split tiles across threads. Preconditions: isa_available(isa);
// cols % col_granularity(t) == 0; the tiles exist; outputs do not alias W or act.
void gemm(Isa isa, WeightType t, const uint8_t* packed, int64_t rows, int64_t cols, int64_t tile0, int64_t n_tiles,
          const uint8_t* const* act, int64_t n_tokens, const GemmOut& out);

// x[i] <- h for i < n (see Activation): gated, x holds the gate values and up the up values; not gated, x
// holds the up values and up is unused (may be null). Vectorized per Isa; relative error < 1e-6.
void activate(Isa isa, const ActParams& p, float* x, const float* up, int64_t n);

// ---- conversion -----------------------------------------------------------------------------------
// Float -> GGUF blocks (our own quantizers, run once at load; the result dequantizes with gguf-py).
// dst holds n_rows * row_bytes(t, cols) bytes. Preconditions: cols % col_granularity(t) == 0; src finite.
void quantize_weights(WeightType t, const float* src, int64_t n_rows, int64_t cols, uint8_t* dst);
// One row of blocks -> cols floats, bit-exactly as gguf-py's dequantize.
void dequantize_row(WeightType t, const uint8_t* src, int64_t cols, float* dst);

}  // namespace ktinject
