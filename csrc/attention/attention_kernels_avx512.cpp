// attend_group built for the avx512 target (flags in CMakeLists.txt).
#include "attention/attention_kernels_impl.h"

namespace ktinject {

void attend_group_avx512(const float* q, int64_t heads, int64_t head_dim, const KvRows& keys, const KvRows& values,
                         int64_t n_keys, const KeyMask& mask, float scale, float* scores, float* out) {
  attend_group_any(q, heads, head_dim, keys, values, n_keys, mask, scale, scores, out);
}

}  // namespace ktinject
