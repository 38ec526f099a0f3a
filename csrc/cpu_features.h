// CPU instruction-set detection from CPUID + XGETBV, so one binary can pick its kernels at run time.
#pragma once

namespace ktinject {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512dq = false;
  bool avx512_vnni = false;
  bool avx512_bf16 = false;
  bool avx_vnni = false;
  bool amx_tile = false;
  bool amx_int8 = false;
  bool amx_bf16 = false;
};

// Detected once and cached. Features the OS does not enable (XSAVE state for YMM/ZMM/tiles) read as false.
const CpuFeatures& cpu_features();

}  // namespace ktinject
