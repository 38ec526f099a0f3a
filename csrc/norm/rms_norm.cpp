#include "norm/rms_norm.h"

#include <cmath>

namespace ktinject {

void rms_norm_rows(const float* x, const float* weight, int64_t rows, int64_t dim, float eps, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* o = out + r * dim;
    // Eight partial sums: vectorizable without reassociating a single running sum.
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8)
      for (int j = 0; j < 8; ++j) part[j] += xr[i + j] * xr[i + j];
    float ss = 0.0f;
    for (float p : part) ss += p;
    for (; i < dim; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
    for (int64_t k = 0; k < dim; ++k) o[k] = xr[k] * inv * weight[k];
  }
}

}  // namespace ktinject
