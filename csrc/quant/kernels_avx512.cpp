// AVX-512 (F/BW/VL/DQ + VNNI) kernels. Compiled with AVX-512 target flags; only called when
// isa_available(Isa::Avx512).
//
// They read the packed layout (packed_format.h): one 64-byte load gives 4 codes of each of 16 rows, and
// vpdpbusd against a broadcast activation dword does 64 multiply-adds whose 16 accumulator lanes are the
// 16 rows. A sub-block's scale is applied once per 8 (Q4_K/Q5_K) or 4 (Q6_K) vpdpbusd, with no
// horizontal reduction anywhere. Up to kMaxTokens tokens share each unpacked weight vector, which is
// what makes prefill-sized batches cheap; at one token the loop streams the weights once.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "quant/act_format.h"
#include "quant/act_quantize.h"
#include "quant/activation_impl.h"
#include "quant/isa_kernels.h"
#include "quant/packed_format.h"
#include "quant/static_for.h"

namespace ktinject {
namespace {

constexpr int kMaxTokens = 8;  // tokens per micro-kernel call (their accumulators stay in registers)

// Weights are streamed from DRAM at decode: while a tile-block is computed, the next tile-block (at least
// 2 KiB ahead) is prefetched. Measured at one token, kernel alone, DRAM-resident: Q8_0 +2%, Q6_K +10%, but
// Q4_K -7% and Q5_K -10% (the hardware streamer keeps up with their lower byte rate; the 36-44 extra
// instructions per tile-block and L1 fill buffers are the cost), so Q4_K/Q5_K do not prefetch. Farther
// ahead, or into L2 only (T1/T2), was never faster.
constexpr size_t kPrefetchAhead = 2048;
inline void prefetch_ahead(const uint8_t* p, size_t bytes) {
  const size_t ahead = (kPrefetchAhead + bytes - 1) / bytes * bytes;  // whole tile-blocks ahead
  for (size_t line = 0; line < bytes; line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p + ahead + line), _MM_HINT_T0);
}

// ---------------------------------------------------------------------------------------------------
// Activation quantization (must produce exactly the scalar kernel's bytes).

struct ActOps {
  static float max_abs(const float* x, int n) {
    __m512 m = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
    return _mm512_reduce_max_ps(m);
  }
  // Round half to even, as the scalar nearbyint; |x * inv| <= 127 by construction of inv.
  static int quantize16(const float* x, float inv, int8_t* q) {
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), _mm512_set1_ps(inv)));
    v = _mm512_max_epi32(_mm512_min_epi32(v, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(v));
    return _mm512_reduce_add_epi32(v);
  }
};

void quantize_act_cols_avx512(WeightType t, const float* x, int64_t cols, int64_t col0, int64_t ncols, uint8_t* row) {
  quantize_act_cols_with(ActOps{}, t, x, cols, col0, ncols, row);
}

// ---------------------------------------------------------------------------------------------------
// Helpers

inline __m512i load(const uint8_t* p) { return _mm512_loadu_si512(p); }

// acc += the 16 dword dot products of w (u8) with the 4 activation bytes at x (s8), broadcast to every
// lane. For one token it is written with the memory operand's embedded broadcast ({1to16}): compilers
// emit a separate vpbroadcastd instead, an extra micro-op per dot product, and fewer micro-ops per weight
// byte let out-of-order execution keep more DRAM reads in flight (Q4_K at one token, DRAM-resident: -5%
// time). With several tokens the compiler's own schedule is faster (Q4_K prefill-128: 4%), so NT > 1
// keeps the intrinsic.
template <int NT>
inline __m512i dot4(__m512i acc, __m512i w, const int8_t* x) {
  if constexpr (NT == 1) {
    asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(x)));
    return acc;
  } else {
    int32_t v;
    std::memcpy(&v, x, 4);
    return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(v));
  }
}

// acc += the 16 dword dot products of w's int16 pairs with the int16 pair at x, broadcast (as dot4).
template <int NT>
inline __m512i dot2w(__m512i acc, __m512i w, const int16_t* x) {
  if constexpr (NT == 1) {
    asm("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(x)));
    return acc;
  } else {
    int32_t v;
    std::memcpy(&v, x, 4);
    return _mm512_dpwssd_epi32(acc, w, _mm512_set1_epi32(v));
  }
}

// 16 fp16 values at p -> floats.
inline __m512 load_f16x16(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

using Acts = ActRows<kMaxTokens>;  // the token group's activation rows, split into their parts

// vpshufb patterns (one shuffle instead of shift + mask, and on another port than the dot products):
// byte b of every dword into its low byte, zeroing the rest; bytes b, b+1 into its two int16 halves.
inline __m512i byte_select(int b) {
  const auto dw = [b](int k) { return static_cast<int>(0x80808000u | static_cast<unsigned>(4 * k + b)); };
  return _mm512_broadcast_i32x4(_mm_setr_epi32(dw(0), dw(1), dw(2), dw(3)));
}
inline __m512i pair_select(int b) {
  const auto dw = [b](int k) {
    return static_cast<int>(0x80008000u | static_cast<unsigned>(4 * k + b) |
                            (static_cast<unsigned>(4 * k + b + 1) << 16));
  };
  return _mm512_broadcast_i32x4(_mm_setr_epi32(dw(0), dw(1), dw(2), dw(3)));
}

// ---------------------------------------------------------------------------------------------------
// Q4_K / Q5_K: 8 sub-blocks of 32, value = d*sc[j]*q - dmin*m[j].

template <int NT, bool FIVE>
void tile_q45(const uint8_t* tile, int64_t nsb, const Acts& a, __m512 out[NT]) {
  constexpr size_t kBlock = FIVE ? 2816 : 2304;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i high4 = _mm512_set1_epi8(static_cast<char>(0xF0));
  const __m512i low6 = _mm512_set1_epi8(0x3F);
  const __m512i bits45 = _mm512_set1_epi8(0x30);
  const __m512i one_bits = _mm512_set1_epi8(0x01);
  __m512 facc[NT];
  for (int i = 0; i < NT; ++i) facc[i] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* p = tile + sb * kBlock;
    const __m512i dm = load(p);
    const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
    const __m512 dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dm, 16)));
    const __m512i b0 = load(p + 64), b1 = load(p + 128), b2 = load(p + 192);
    // 6-bit scales and mins, 4 per lane-dword: sc0..3, sc4..7, m0..3, m4..7
    const __m512i sc_lo = _mm512_and_si512(b0, low6);
    const __m512i m_lo = _mm512_and_si512(b1, low6);
    const __m512i sc_hi =
        _mm512_or_si512(_mm512_and_si512(b2, low4), _mm512_and_si512(_mm512_srli_epi32(b0, 2), bits45));
    const __m512i m_hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(b2, 4), low4),
                                         _mm512_and_si512(_mm512_srli_epi32(b1, 2), bits45));
    // Min pairs as int16 (m[2p] | m[2p+1] << 16) for vpdpwssd against the activation's bsum32 pairs.
    const __m512i pairs[4] = {_mm512_shuffle_epi8(m_lo, pair_select(0)), _mm512_shuffle_epi8(m_lo, pair_select(2)),
                              _mm512_shuffle_epi8(m_hi, pair_select(0)), _mm512_shuffle_epi8(m_hi, pair_select(2))};
    __m512i isum[NT], msum[NT];
    for (int i = 0; i < NT; ++i) {
      isum[i] = _mm512_setzero_si512();
      msum[i] = _mm512_setzero_si512();
      for (int q = 0; q < 4; ++q) msum[i] = dot2w<NT>(msum[i], pairs[q], a.s32[i] + 8 * sb + 2 * q);
    }
    const uint8_t* qh = p + 256;
    const uint8_t* qs = p + (FIVE ? 768 : 256);
    // High nibbles are used in place (16 * q, masked with 0xF0: no shift); their sums are exact multiples
    // of 16 and are divided back once per super-block.
    __m512i isum_hi[NT];
    for (int i = 0; i < NT; ++i) isum_hi[i] = _mm512_setzero_si512();
    static_for<8>([&](auto J) {  // sub-block j = 2g + half: low (half 0) or high (half 1) nibbles of group g
      constexpr int j = decltype(J)::value, g = j / 2, half = j % 2;
      const __m512i scj = _mm512_shuffle_epi8(j < 4 ? sc_lo : sc_hi, byte_select(j % 4));
      __m512i w[8];
      for (int k = 0; k < 8; ++k) {
        const __m512i v = load(qs + 64 * (8 * g + k));
        if (FIVE) {  // 5-bit codes: 16 * q would not fit a byte, so shift the high nibble down
          const __m512i hb = _mm512_and_si512(_mm512_srli_epi32(load(qh + 64 * k), j), one_bits);
          w[k] = _mm512_or_si512(_mm512_and_si512(half ? _mm512_srli_epi16(v, 4) : v, low4), _mm512_slli_epi32(hb, 4));
        } else {
          w[k] = _mm512_and_si512(v, half ? high4 : low4);
        }
      }
      for (int i = 0; i < NT; ++i) {
        const int8_t* x = a.qs[i] + 256 * sb + 32 * j;
        // One chain of 8 dot products per sub-block: sub-blocks are independent, so out-of-order
        // execution overlaps the chains (splitting each in two measured 1-3% slower at one token).
        __m512i acc = _mm512_setzero_si512();
        for (int k = 0; k < 8; ++k) acc = dot4<NT>(acc, w[k], x + 4 * k);
        if (half && !FIVE) {
          isum_hi[i] = _mm512_add_epi32(isum_hi[i], _mm512_mullo_epi32(acc, scj));
        } else {
          isum[i] = _mm512_add_epi32(isum[i], _mm512_mullo_epi32(acc, scj));
        }
      }
    });
    for (int i = 0; i < NT; ++i) isum[i] = _mm512_add_epi32(isum[i], _mm512_srai_epi32(isum_hi[i], 4));
    for (int i = 0; i < NT; ++i) {
      const __m512 ad = _mm512_set1_ps(a.d[i][sb]);
      facc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i]), _mm512_mul_ps(d, ad), facc[i]);
      facc[i] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum[i]), _mm512_mul_ps(dmin, ad), facc[i]);
    }
  }
  for (int i = 0; i < NT; ++i) out[i] = facc[i];
}

// ---------------------------------------------------------------------------------------------------
// Q6_K: 16 sub-blocks of 16, value = d*sc[j]*(q - 32), q = 4 low bits (ql) | 2 high bits (qh) << 4.

template <int NT>
void tile_q6(const uint8_t* tile, int64_t nsb, const Acts& a, __m512 out[NT]) {
  constexpr size_t kMain = 3328;
  const uint8_t* tail = tile + nsb * kMain;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i bits45 = _mm512_set1_epi8(0x30);
  __m512 facc[NT];
  for (int i = 0; i < NT; ++i) facc[i] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* p = tile + sb * kMain;
    prefetch_ahead(p, kMain);
    const __m512 d = load_f16x16(tail + 32 * sb);
    const __m512i s4[4] = {load(p + 3072), load(p + 3136), load(p + 3200), load(p + 3264)};
    __m512i isum[NT];
    for (int i = 0; i < NT; ++i) isum[i] = _mm512_setzero_si512();
    static_for<8>([&](auto HS) {  // 32 columns 128h + 32s .. +31: sub-blocks j0 = 8h + 2s and j0 + 1
      {
        constexpr int h = decltype(HS)::value / 4, s = decltype(HS)::value % 4, j0 = 8 * h + 2 * s;
        __m512i w[8];
        for (int k = 0; k < 8; ++k) {
          const __m512i ql = load(p + 64 * (16 * h + 8 * (s % 2) + k));
          const __m512i qh = load(p + 2048 + 64 * (8 * h + k));
          // The 2 high bits (bits 2s, 2s+1 of each qh byte) moved straight to bits 4-5 with one shift.
          __m512i hi = s < 2 ? _mm512_slli_epi16(qh, 4 - 2 * s) : (s == 2 ? qh : _mm512_srli_epi16(qh, 2));
          hi = _mm512_and_si512(hi, bits45);
          // (low nibble & 0x0F) | hi in one vpternlogd
          w[k] = _mm512_ternarylogic_epi32(s >= 2 ? _mm512_srli_epi16(ql, 4) : ql, low4, hi, 0xEA);
        }
        // Sign-extended int8 scales of sub-blocks j0 and j0+1 (bytes j0%4, j0%4+1 of dword j0/4).
        const __m512i sv = s4[j0 / 4];
        const __m512i sc0 = _mm512_srai_epi32(_mm512_slli_epi32(sv, 24 - 8 * (j0 % 4)), 24);
        const __m512i sc1 = _mm512_srai_epi32(_mm512_slli_epi32(sv, 24 - 8 * (j0 % 4 + 1)), 24);
        for (int i = 0; i < NT; ++i) {
          const int8_t* x = a.qs[i] + 256 * sb + 128 * h + 32 * s;
          __m512i acc0 = _mm512_set1_epi32(-32 * a.s16[i][16 * sb + j0]);
          __m512i acc1 = _mm512_set1_epi32(-32 * a.s16[i][16 * sb + j0 + 1]);
          for (int k = 0; k < 4; ++k) acc0 = dot4<NT>(acc0, w[k], x + 4 * k);
          for (int k = 4; k < 8; ++k) acc1 = dot4<NT>(acc1, w[k], x + 4 * k);
          isum[i] =
              _mm512_add_epi32(isum[i], _mm512_add_epi32(_mm512_mullo_epi32(acc0, sc0), _mm512_mullo_epi32(acc1, sc1)));
        }
      }
    });
    for (int i = 0; i < NT; ++i)
      facc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i]), _mm512_mul_ps(d, _mm512_set1_ps(a.d[i][sb])), facc[i]);
  }
  for (int i = 0; i < NT; ++i) out[i] = facc[i];
}

// ---------------------------------------------------------------------------------------------------
// Q8_0: blocks of 32, value = d*q; codes stored as q + 128 (u8), corrected by the activation's nsum.

template <int NT>
void tile_q8(const uint8_t* tile, int64_t nblk, const Acts& a, __m512 out[NT]) {
  const uint8_t* tail = tile + nblk * 512;
  __m512 facc[NT];
  for (int i = 0; i < NT; ++i) facc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nblk; ++b) {
    const uint8_t* p = tile + b * 512;
    prefetch_ahead(p, 512);
    const __m512 wd = load_f16x16(tail + 32 * b);
    __m512i w[8];
    for (int k = 0; k < 8; ++k) w[k] = load(p + 64 * k);
    for (int i = 0; i < NT; ++i) {
      const int8_t* x = a.qs[i] + 32 * b;
      __m512i acc = _mm512_set1_epi32(reinterpret_cast<const int32_t*>(a.s16[i])[b]);
      for (int k = 0; k < 8; ++k) acc = dot4<NT>(acc, w[k], x + 4 * k);
      facc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(wd, _mm512_set1_ps(a.d[i][b])), facc[i]);
    }
  }
  for (int i = 0; i < NT; ++i) out[i] = facc[i];
}

// ---------------------------------------------------------------------------------------------------
// Float weights: exact f32 FMAs on f32 activations.

template <int NT, WeightType T>
void tile_float(const uint8_t* tile, int64_t cols, const Acts& a, __m512 out[NT]) {
  __m512 f0[NT], f1[NT];  // two chains per token hide the FMA latency
  for (int i = 0; i < NT; ++i) f0[i] = f1[i] = _mm512_setzero_ps();
  if (T == WeightType::F32) {
    int64_t c = 0;
    for (; c + 1 < cols; c += 2) {
      prefetch_ahead(tile + 64 * c, 128);
      const __m512 w0 = _mm512_loadu_ps(reinterpret_cast<const float*>(tile + 64 * c));
      const __m512 w1 = _mm512_loadu_ps(reinterpret_cast<const float*>(tile + 64 * (c + 1)));
      for (int i = 0; i < NT; ++i) {
        f0[i] = _mm512_fmadd_ps(w0, _mm512_set1_ps(a.f[i][c]), f0[i]);
        f1[i] = _mm512_fmadd_ps(w1, _mm512_set1_ps(a.f[i][c + 1]), f1[i]);
      }
    }
    if (c < cols) {
      const __m512 w0 = _mm512_loadu_ps(reinterpret_cast<const float*>(tile + 64 * c));
      for (int i = 0; i < NT; ++i) f0[i] = _mm512_fmadd_ps(w0, _mm512_set1_ps(a.f[i][c]), f0[i]);
    }
  } else {
    const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int64_t g = 0; g < cols / 2; ++g) {
      prefetch_ahead(tile + 64 * g, 64);
      const __m512i v = load(tile + 64 * g);
      __m512 we, wo;
      if (T == WeightType::BF16) {
        we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        wo = _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask));
      } else {
        we = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v));
        wo = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)));
      }
      for (int i = 0; i < NT; ++i) {
        f0[i] = _mm512_fmadd_ps(we, _mm512_set1_ps(a.f[i][2 * g]), f0[i]);
        f1[i] = _mm512_fmadd_ps(wo, _mm512_set1_ps(a.f[i][2 * g + 1]), f1[i]);
      }
    }
  }
  for (int i = 0; i < NT; ++i) out[i] = _mm512_add_ps(f0[i], f1[i]);
}

// ---------------------------------------------------------------------------------------------------
// Driver: tiles outer (a tile's weights stay in L1/L2 while token groups reuse them), tokens inner.

// One micro-kernel per type; no default, so -Wswitch names a type added without one.
template <int NT>
void tile_dispatch(WeightType t, const uint8_t* tile, int64_t cols, const Acts& a, __m512 out[NT]) {
  switch (t) {
    case WeightType::Q4_K:
      tile_q45<NT, false>(tile, cols / 256, a, out);
      return;
    case WeightType::Q5_K:
      tile_q45<NT, true>(tile, cols / 256, a, out);
      return;
    case WeightType::Q6_K:
      tile_q6<NT>(tile, cols / 256, a, out);
      return;
    case WeightType::Q8_0:
      tile_q8<NT>(tile, cols / 32, a, out);
      return;
    case WeightType::F32:
      tile_float<NT, WeightType::F32>(tile, cols, a, out);
      return;
    case WeightType::F16:
      tile_float<NT, WeightType::F16>(tile, cols, a, out);
      return;
    case WeightType::BF16:
      tile_float<NT, WeightType::BF16>(tile, cols, a, out);
      return;
  }
}

template <int NT>
void run_group(WeightType t, const uint8_t* tile, int64_t cols, const uint8_t* const* act, int64_t i0, __mmask16 mask,
               const GemmOut& o, int64_t off) {
  const Acts a = split_act_rows<kMaxTokens>(t, act + i0, NT, cols);
  __m512 v[NT];
  tile_dispatch<NT>(t, tile, cols, a, v);
  for (int i = 0; i < NT; ++i) {  // in token order: two tokens may share an output row
    float* dst = o.rows[i0 + i] + o.col0 + off;
    __m512 r = v[i];
    if (o.scale != nullptr) r = _mm512_fmadd_ps(r, _mm512_set1_ps(o.scale[i0 + i]), _mm512_maskz_loadu_ps(mask, dst));
    _mm512_mask_storeu_ps(dst, mask, r);
  }
}

void gemm_avx512(WeightType t, const uint8_t* packed, int64_t rows, int64_t cols, int64_t tile0, int64_t n_tiles,
                 const uint8_t* const* act, int64_t n_tokens, const GemmOut& out) {
  const size_t tb = tile_bytes(t, cols);
  for (int64_t tile = tile0; tile < tile0 + n_tiles; ++tile) {
    const uint8_t* tp = packed + tile * tb;
    const int64_t valid = std::min<int64_t>(kTileRows, rows - tile * kTileRows);
    const __mmask16 mask = valid >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << valid) - 1);
    const int64_t off = (tile - tile0) * kTileRows;
    for_token_groups<kMaxTokens>(n_tokens,
                                 [&](auto NT, int64_t i0) { run_group<NT>(t, tp, cols, act, i0, mask, out, off); });
  }
}

void activate_avx512(const ActParams& p, float* x, const float* up, int64_t n) { act_impl::activate(p, x, up, n); }

}  // namespace

const IsaKernels& avx512_kernels() {
  static const IsaKernels k{quantize_act_cols_avx512, gemm_avx512, activate_avx512};
  return k;
}

}  // namespace ktinject
