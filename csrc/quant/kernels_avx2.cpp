// Placeholder until the AVX2 kernels land: forwards to the scalar reference.
#include "quant/isa_kernels.h"

namespace ktinject {
const IsaKernels& avx2_kernels() { return scalar_kernels(); }
}  // namespace ktinject
