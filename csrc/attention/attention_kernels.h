// The inner loops of attention at few query tokens: one query head against the cached keys and values
// of its KV head. Scalar / AVX2 / AVX-512 builds of one source (attention_kernels_impl.h), chosen by Isa.
// Raw pointers only; AttentionLayer (attention.h) and the binding validate shapes before calling.
#pragma once

#include <cstdint>

#include "quant/kernels.h"

namespace ktinject {

// Keys or values of one (batch row, KV head): row s (head_dim contiguous elements) at data + s * stride
// elements, float32 or bfloat16 bits.
struct KvRows {
  const void* data = nullptr;
  int64_t stride = 0;
  bool bf16 = false;
};

// Which keys one query may see. Key s is visible when s <= last and (allow == nullptr || allow[s] != 0);
// add (nullptr: none) is added to the scaled score of key s (an additive mask; -inf hides the key).
struct KeyMask {
  int64_t last = 0;
  const uint8_t* allow = nullptr;
  const float* add = nullptr;
};

// out[head_dim] = softmax(scale * K q + mask) V over keys [0, n_keys). `scores` is scratch of n_keys
// floats. A query that sees no key gets zeros (as a fully padded row); non-finite inputs give non-finite
// outputs (never hidden). Preconditions: isa_available(isa); the rows exist.
void attend_head(Isa isa, const float* q, int64_t head_dim, const KvRows& keys, const KvRows& values, int64_t n_keys,
                 const KeyMask& mask, float scale, float* scores, float* out);

// Per-ISA builds (attention_kernels_<isa>.cpp), called by attend_head.
void attend_head_scalar(const float*, int64_t, const KvRows&, const KvRows&, int64_t, const KeyMask&, float, float*,
                        float*);
void attend_head_avx2(const float*, int64_t, const KvRows&, const KvRows&, int64_t, const KeyMask&, float, float*,
                      float*);
void attend_head_avx512(const float*, int64_t, const KvRows&, const KvRows&, int64_t, const KeyMask&, float, float*,
                        float*);

}  // namespace ktinject
