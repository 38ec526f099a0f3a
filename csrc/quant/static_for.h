// Compile-time loops for the SIMD kernels: the body sees its index as a constant, so shift counts and
// register indices are immediates (a variable vector shift costs an extra uop, and GCC does not always
// unroll loops whose trip count it knows). Internal linkage: each ISA unit keeps its own copy.
#pragma once

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

}  // namespace
}  // namespace ktinject
