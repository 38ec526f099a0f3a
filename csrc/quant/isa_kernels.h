// Per-ISA kernel entry points behind the dispatch in kernels.cpp. Each ISA lives in its own translation
// unit compiled with its own target flags; only the matching one is ever called.
#pragma once

#include <cstdint>

#include "quant/kernels.h"

namespace ktinject {

struct IsaKernels {
  void (*quantize_act)(WeightType t, const float* x, int64_t n_tokens, int64_t cols, uint8_t* dst);
  void (*gemm)(WeightType t, const uint8_t* W, int64_t row0, int64_t n_rows, int64_t cols,
               const uint8_t* act, int64_t n_tokens, float* out, int64_t out_stride);
};

const IsaKernels& scalar_kernels();
#if defined(KTINJECT_QUANT_X86)
const IsaKernels& avx2_kernels();
const IsaKernels& avx512_kernels();
#endif

}  // namespace ktinject
