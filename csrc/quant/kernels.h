// Weight formats and dot-product kernels of the CPU MoE operator: one API over GGUF block formats
// (Q8_0, Q4_K, Q5_K, Q6_K) and float rows (F32, F16, BF16), with scalar / AVX2 / AVX-512 variants
// chosen at run time. Raw pointers and shapes only; the binding layer and the MoE driver validate
// arguments, so every function here states its preconditions instead of checking them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace ktinject {

// Values are the GGML type ids, so a GGUF tensor's type converts directly.
enum class WeightType : int { F32 = 0, F16 = 1, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };

// Kernel families. Avx2 needs AVX2+FMA+F16C; Avx512 needs AVX-512 F/BW/VL/DQ + VNNI (AVX512-BF16 is
// used when present, but is not required).
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// True when type_id is one of the WeightType values above.
bool weight_type_supported(int type_id);
// "f32", "f16", "q8_0", "q4_k", "q5_k", "q6_k", "bf16".
const char* weight_type_name(WeightType t);
// Elements per block: 1 for float types, 32 for Q8_0, 256 for K-quants.
int block_elems(WeightType t);
// Bytes of one block (float types: element size).
size_t block_bytes(WeightType t);
// Bytes of one weight row. Precondition: cols % block_elems(t) == 0.
size_t row_bytes(WeightType t, int64_t cols);

// Best kernel family of this CPU. KTINJECT_ISA=scalar|avx2|avx512 forces a lower one; naming one the
// CPU (or this build) lacks, or an unknown name, throws std::invalid_argument.
Isa best_isa();
// "scalar" | "avx2" | "avx512" -> Isa; throws std::invalid_argument on an unknown name or an ISA
// this CPU/build cannot run.
Isa parse_isa(const std::string& name);
const char* isa_name(Isa isa);
// True when this CPU and build can run kernels of `isa`.
bool isa_available(Isa isa);

// Activations are converted once per (token, weight type) into the form the weight type's dot product
// reads: int8 with one f32 scale per 256 elements plus 16-element sums for the K-quants, int8 with one
// f32 scale per 32 elements for Q8_0, f32 for the float types. The layout is private to this layer
// (identical for every Isa, so any Isa may read what another wrote); callers only size buffers.
// Precondition: cols % block_elems(t) == 0. The size is a multiple of 64; 64-byte-aligned buffers are
// fastest.
size_t act_row_bytes(WeightType t, int64_t cols);

// Converts n_tokens rows of x (row stride cols floats) into dst (row stride act_row_bytes(t, cols)).
// Preconditions: isa_available(isa); cols % block_elems(t) == 0; x finite.
void quantize_act(Isa isa, WeightType t, const float* x, int64_t n_tokens, int64_t cols, uint8_t* dst);

// out[tok * out_stride + r] = dot(W row (row0 + r), act row tok), r in [0, n_rows), tok in [0, n_tokens).
// W points at row 0 of the matrix; rows are row_bytes(t, cols) apart; act rows act_row_bytes(t, cols)
// apart, written by quantize_act for the same t and cols. Output is overwritten, not accumulated.
// Single-threaded: the caller splits rows across threads (any row0/n_rows split is valid).
// Preconditions: isa_available(isa); cols % block_elems(t) == 0; n_rows, n_tokens >= 0;
// out_stride >= n_rows; out does not alias W or act.
void gemm(Isa isa, WeightType t, const uint8_t* W, int64_t row0, int64_t n_rows, int64_t cols,
          const uint8_t* act, int64_t n_tokens, float* out, int64_t out_stride);

// Float -> GGUF blocks (our own quantizers, run once at load; the result dequantizes with gguf-py).
// dst holds n_rows * row_bytes(t, cols) bytes. Preconditions: cols % block_elems(t) == 0; src finite.
void quantize_weights(WeightType t, const float* src, int64_t n_rows, int64_t cols, uint8_t* dst);
// One row of blocks -> cols floats, bit-exactly as gguf-py's dequantize.
// Precondition: cols % block_elems(t) == 0.
void dequantize_row(WeightType t, const uint8_t* src, int64_t cols, float* dst);

}  // namespace ktinject
