// Run-time ISA dispatch of the quant kernels (the weight types' facts are the table in weight_types.h).
#include "quant/kernels.h"

#include <cstdlib>
#include <stdexcept>

#include "cpu_features.h"
#include "quant/act_format.h"
#include "quant/isa_kernels.h"

namespace ktinject {

size_t act_row_bytes(WeightType t, int64_t cols) { return act_layout(t, cols).bytes; }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar:
      return "scalar";
    case Isa::Avx2:
      return "avx2";
    case Isa::Avx512:
      return "avx512";
  }
  return "unknown";
}

bool isa_available(Isa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::Scalar:
      return true;
#if defined(KTINJECT_QUANT_X86)
    case Isa::Avx2:
      return f.avx2 && f.fma && f.f16c;
    case Isa::Avx512:
      return f.avx2 && f.fma && f.f16c && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512_vnni;
#endif
    default:
      (void)f;
      return false;
  }
}

Isa parse_isa(const std::string& name) {
  Isa isa;
  if (name == "scalar") {
    isa = Isa::Scalar;
  } else if (name == "avx2") {
    isa = Isa::Avx2;
  } else if (name == "avx512") {
    isa = Isa::Avx512;
  } else {
    throw std::invalid_argument("unknown ISA '" + name + "' (expected scalar, avx2 or avx512)");
  }
  if (!isa_available(isa)) {
    throw std::invalid_argument("ISA '" + name + "' is not available on this CPU/build (best is '" +
                                isa_name(isa_available(Isa::Avx512) ? Isa::Avx512
                                         : isa_available(Isa::Avx2) ? Isa::Avx2
                                                                    : Isa::Scalar) +
                                "')");
  }
  return isa;
}

Isa best_isa() {
  const char* forced = std::getenv("KTINJECT_ISA");
  if (forced != nullptr && *forced != '\0') return parse_isa(forced);
  if (isa_available(Isa::Avx512)) return Isa::Avx512;
  if (isa_available(Isa::Avx2)) return Isa::Avx2;
  return Isa::Scalar;
}

namespace {

const IsaKernels& kernels_for(Isa isa) {
#if defined(KTINJECT_QUANT_X86)
  if (isa == Isa::Avx512) return avx512_kernels();
  if (isa == Isa::Avx2) return avx2_kernels();
#endif
  (void)isa;
  return scalar_kernels();
}

}  // namespace

void quantize_act_cols(Isa isa, WeightType t, const float* x, int64_t cols, int64_t col0, int64_t ncols, uint8_t* row) {
  if (ncols <= 0) return;
  kernels_for(isa).quantize_act_cols(t, x, cols, col0, ncols, row);
}

void gemm(Isa isa, WeightType t, const uint8_t* packed, int64_t rows, int64_t cols, int64_t tile0, int64_t n_tiles,
          const uint8_t* const* act, int64_t n_tokens, const GemmOut& out) {
  if (n_tiles <= 0 || n_tokens <= 0) return;
  kernels_for(isa).gemm(t, packed, rows, cols, tile0, n_tiles, act, n_tokens, out);
}

bool activation_is_elementwise(Activation a) {
  switch (a) {
    case Activation::Silu:
    case Activation::Gelu:
    case Activation::GeluTanh:
    case Activation::Relu:
    case Activation::Relu2:
    case Activation::QuickGelu:
      return true;
    default:
      return false;
  }
}

void activate(Isa isa, const ActParams& p, float* x, const float* up, int64_t n) {
  kernels_for(isa).activate(p, x, up, n);
}

}  // namespace ktinject
