// Per-ISA kernel entry points behind the dispatch in kernels.cpp. Each ISA lives in its own translation
// unit compiled with its own target flags; only the matching one is ever called.
#pragma once

#include <cstdint>

#include "quant/kernels.h"

namespace ktinject {

struct IsaKernels {
  void (*quantize_act_cols)(WeightType t, const float* x, int64_t cols, int64_t col0, int64_t ncols, uint8_t* row);
  void (*gemm)(WeightType t, const uint8_t* packed, int64_t rows, int64_t cols, int64_t tile0, int64_t n_tiles,
               const uint8_t* const* act, int64_t n_tokens, const GemmOut& out);
  void (*activate)(const ActParams& p, float* x, const float* up, int64_t n);
};

const IsaKernels& scalar_kernels();
#if defined(KTINJECT_QUANT_X86)
const IsaKernels& avx2_kernels();
const IsaKernels& avx512_kernels();
#endif

}  // namespace ktinject
