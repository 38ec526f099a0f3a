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

// For `heads` query heads sharing one KV head (q and out: heads x head_dim floats, consecutive):
// out[h] = softmax(scale * K q[h] + mask) V over keys [0, n_keys). Each key and value row is read once for all
// the heads. `scores` is scratch of heads * n_keys floats. A query that sees no key gets zeros (as a fully
// padded row); non-finite inputs give non-finite outputs (never hidden). Preconditions: isa_available(isa);
// the rows exist.
void attend_group(Isa isa, const float* q, int64_t heads, int64_t head_dim, const KvRows& keys, const KvRows& values,
                  int64_t n_keys, const KeyMask& mask, float scale, float* scores, float* out);

// Per-ISA builds (attention_kernels_<isa>.cpp), called by attend_group.
#define KTINJECT_ATTEND_GROUP(suffix)                                                                               \
  void attend_group_##suffix(const float*, int64_t, int64_t, const KvRows&, const KvRows&, int64_t, const KeyMask&, \
                             float, float*, float*)
KTINJECT_ATTEND_GROUP(scalar);
KTINJECT_ATTEND_GROUP(avx2);
KTINJECT_ATTEND_GROUP(avx512);
#undef KTINJECT_ATTEND_GROUP

}  // namespace ktinject
