// Compile-time loops for the SIMD kernels: the body sees its index as a constant, so shift counts and
// register indices are immediates (a variable vector shift costs an extra uop, and GCC does not always
// unroll loops whose trip count it knows). Internal linkage: each ISA unit keeps its own copy.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

namespace ktinject {
namespace {

template <typename F, int... I>
inline void static_for_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}

// Calls f(std::integral_constant<int, 0>{}) ... f(std::integral_constant<int, N - 1>{}).
template <int N, typename F>
inline void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>{});
}

template <int NT, typename F>
inline void token_rest(int64_t n, int64_t i0, F&& f) {
  if constexpr (NT > 0) {
    if (n == NT) {
      f(std::integral_constant<int, NT>{}, i0);
    } else {
      token_rest<NT - 1>(n, i0, f);
    }
  }
}

// The gemm drivers' token loop: f(std::integral_constant<int, NT>{}, i0) for groups of kMax tokens from
// i0 = 0, then once for the n < kMax left (each group size is its own micro-kernel instantiation).
template <int kMax, typename F>
inline void for_token_groups(int64_t n_tokens, F&& f) {
  int64_t i0 = 0;
  for (; i0 + kMax <= n_tokens; i0 += kMax) f(std::integral_constant<int, kMax>{}, i0);
  token_rest<kMax - 1>(n_tokens - i0, i0, f);
}

}  // namespace
}  // namespace ktinject
