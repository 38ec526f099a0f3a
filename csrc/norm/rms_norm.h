// RMSNorm over rows, in the calling thread: out = x / sqrt(mean(x^2) + eps) * weight, float32 throughout
// (transformers' RMSNorm computes the normalization in float32 too). At one token a row is a few KB: a
// pool hand-over would cost more than the arithmetic.
#pragma once

#include <cstdint>

namespace ktinject {

// x and out [rows, dim] (may alias), weight [dim]. Non-finite inputs give non-finite rows.
void rms_norm_rows(const float* x, const float* weight, int64_t rows, int64_t dim, float eps, float* out);

}  // namespace ktinject
