// AVX2 + FMA + F16C kernels. Compiled with those target flags only; only called when
// isa_available(Isa::Avx2).
//
// Same packed layout and structure as the AVX-512 kernels (kernels_avx512.cpp). A 64-byte packed vector
// (4 bytes of each of 16 rows) is read as two 32-byte halves, rows 0-7 and rows 8-15, so every
// accumulator lane is still one row and nothing is summed horizontally. Without vpdpbusd, an int8 dot
// product is vpmaddubsw (u8 weight x s8 activation -> int16 pairs) followed by vpmaddwd, which widens to
// int32 and at the same time multiplies by the sub-block scale (the scale is placed in both int16 halves
// of each row's dword). vpmaddubsw saturates at int16, so each format sums only as many of its products
// in int16 as provably fit (see the per-format comments). Up to kMaxTokens tokens share each unpacked
// weight vector; at one token the loop streams the weights once.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "quant/act_format.h"
#include "quant/act_quantize.h"
#include "quant/activation_impl.h"
#include "quant/isa_kernels.h"
#include "quant/packed_format.h"
#include "quant/static_for.h"

namespace ktinject {
namespace {

constexpr int kMaxTokens = 4;  // tokens per micro-kernel call: with 16 ymm registers, 4 tokens' int16 and
                               // int32 accumulators plus the shared weight vector still fit

// An integer accumulation acc += p0; acc += p1; ... is a plain vector `+` to GCC, which reassociates it into
// a tree: every product is computed first and kept live, and with several tokens they spill to the stack
// (measured: 1.4x slower at 8 tokens). An empty asm makes each partial sum opaque, so a chain stays a
// chain. It emits no instruction.
inline __m256i chain(__m256i v) {
  asm("" : "+x"(v));
  return v;
}

// Both row halves of a tile-block read the same activation bytes. Left alone, GCC hoists those broadcasts
// out of the loop over halves and keeps one ymm per activation dword, which spills. A pointer passed
// through an empty asm is a new value in every half, so each half broadcasts again (cheap: a load).
template <typename T>
inline const T* per_half(const T* p) {
  asm("" : "+r"(p));
  return p;
}

// Weights are streamed from DRAM at decode and the hardware prefetchers alone fetch them too late: each
// tile-block prefetches the next one, and the 512-byte steps of Q8_0 and the float types the one 2 KB
// ahead (measured on one core: Q6_K 1.2x faster at 1 token, BF16 ~10%; prefetching never faults, so
// running past the end of the matrix is harmless).
inline void prefetch(const uint8_t* p, size_t bytes) {
  for (size_t line = 0; line < bytes; line += 64) _mm_prefetch(reinterpret_cast<const char*>(p + line), _MM_HINT_T0);
}
constexpr size_t kStepAhead = 2048;

// ---------------------------------------------------------------------------------------------------
// Activation quantization (must produce exactly the scalar kernel's bytes).

inline float max_abs(const float* x, int n8) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  for (int i = 0; i < n8; ++i) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + 8 * i)));
  __m128 r = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  r = _mm_max_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

inline int hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// 8 floats -> 8 int32 codes. Clamping in float before the conversion matches the scalar
// clamp(nearbyint(x * id)) for every input: the bounds are integers, cvtps rounds half to even like
// nearbyint, max_ps returns -127 for a NaN product (as std::max(-127.f, NaN) does), and an infinite
// product (id = inf for a denormal amax) clamps to +-127 instead of cvtps's 0x80000000.
inline __m256i quantize8(const float* x, __m256 id) {
  __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x), id);
  v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
  return _mm256_cvtps_epi32(v);
}

// 16 floats -> 16 int8 codes at q; returns their sum.
inline int quantize16(const float* x, __m256 id, int8_t* q) {
  const __m256i a = quantize8(x, id), b = quantize8(x + 8, id);
  // packs works within 128-bit lanes: [a0-3 b0-3 | a4-7 b4-7] -> reorder the 64-bit quarters to a, b.
  const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q),
                   _mm_packs_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1)));
  return hsum_epi32(_mm256_add_epi32(a, b));
}

struct ActOps {
  static float max_abs(const float* x, int n) { return ktinject::max_abs(x, n / 8); }
  static int quantize16(const float* x, float inv, int8_t* q) {
    return ktinject::quantize16(x, _mm256_set1_ps(inv), q);
  }
};

void quantize_act_cols_avx2(WeightType t, const float* x, int64_t cols, int64_t col0, int64_t ncols, uint8_t* row) {
  quantize_act_cols_with(ActOps{}, t, x, cols, col0, ncols, row);
}

// ---------------------------------------------------------------------------------------------------
// Helpers. "Half" below is one 32-byte half of a packed vector: 4 bytes of each of 8 rows.

inline __m256i load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

inline __m256i bcast32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// vpshufb selects bytes within each 128-bit lane: the same 16 selectors for both lanes. A selector with the
// top bit set (-1) gives a zero byte.
inline __m256i shuffle_lanes(__m256i v, __m128i sel) {
  return _mm256_shuffle_epi8(v, _mm256_broadcastsi128_si256(sel));
}

// Per row dword: int16 (byte B0) | int16 (byte B1) << 16, bytes zero-extended.
template <int B0, int B1>
inline __m256i bytes_u16(__m256i v) {
  return shuffle_lanes(
      v, _mm_setr_epi8(B0, -1, B1, -1, 4 + B0, -1, 4 + B1, -1, 8 + B0, -1, 8 + B1, -1, 12 + B0, -1, 12 + B1, -1));
}

// Per row dword: its int16 lane L in both int16 lanes.
template <int L>
inline __m256i dup_i16(__m256i v) {
  constexpr int a = 2 * L, b = 2 * L + 1;
  return shuffle_lanes(v, _mm_setr_epi8(a, b, a, b, 4 + a, 4 + b, 4 + a, 4 + b, 8 + a, 8 + b, 8 + a, 8 + b, 12 + a,
                                        12 + b, 12 + a, 12 + b));
}

// 8 row dwords of two fp16 values (low | high << 16) -> the 8 low and the 8 high values as floats.
inline void split_f16_pairs(__m256i v, __m256& lo, __m256& hi) {
  const __m256i lane = shuffle_lanes(v, _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15));
  const __m256i g = _mm256_permute4x64_epi64(lane, 0xD8);  // [lo 0-3, lo 4-7 | hi 0-3, hi 4-7]
  lo = _mm256_cvtph_ps(_mm256_castsi256_si128(g));
  hi = _mm256_cvtph_ps(_mm256_extracti128_si256(g, 1));
}

using Acts = ActRows<kMaxTokens>;  // the token group's activation rows, split into their parts

// out[i][h]: token i's results for rows 8h .. 8h+7 of the tile.
template <int NT>
using TileOut = __m256[NT][2];

// ---------------------------------------------------------------------------------------------------
// Q4_K / Q5_K: 8 sub-blocks of 32, value = d*sc[j]*q - dmin*m[j].
// int16 bounds: one vpmaddubsw lane is at most 2 * 15 * 127 = 3810 (Q4) or 2 * 31 * 127 = 7874 (Q5), so a
// whole sub-block (8 of them, 30480) fits for Q4 and half of one (4, 31496) for Q5. The high nibble is
// shifted down rather than used in place (16 * q would overflow the int16 pairs).

template <int NT, bool FIVE>
void tile_q45(const uint8_t* tile, int64_t nsb, const Acts& a, TileOut<NT>& out) {
  constexpr size_t kBlock = FIVE ? 2816 : 2304;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i low6 = _mm256_set1_epi8(0x3F);
  const __m256i bits45 = _mm256_set1_epi8(0x30);
  const __m256i bit4 = _mm256_set1_epi8(0x10);
  __m256 facc[NT][2];
  for (int i = 0; i < NT; ++i) facc[i][0] = facc[i][1] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* p = tile + sb * kBlock;
    prefetch(p + kBlock, kBlock);
    for (int h = 0; h < 2; ++h) {  // both row halves while the tile-block is in L1
      const uint8_t* ph = p + 32 * h;
      __m256 d, dmin;
      split_f16_pairs(load(ph), d, dmin);
      const __m256i b0 = load(ph + 64), b1 = load(ph + 128), b2 = load(ph + 192);
      // 6-bit scales and mins, 4 per row dword: sc0..3, sc4..7, m0..3, m4..7
      const __m256i sc_lo = _mm256_and_si256(b0, low6);
      const __m256i m_lo = _mm256_and_si256(b1, low6);
      const __m256i sc_hi =
          _mm256_or_si256(_mm256_and_si256(b2, low4), _mm256_and_si256(_mm256_srli_epi32(b0, 2), bits45));
      const __m256i m_hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(b2, 4), low4),
                                           _mm256_and_si256(_mm256_srli_epi32(b1, 2), bits45));
      // Min pairs (m[2q], m[2q+1]) as int16: vpmaddwd against the activation's (bsum32[2q], bsum32[2q+1]).
      const __m256i pairs[4] = {bytes_u16<0, 1>(m_lo), bytes_u16<2, 3>(m_lo), bytes_u16<0, 1>(m_hi),
                                bytes_u16<2, 3>(m_hi)};
      __m256i isum[NT], msum[NT];
      for (int i = 0; i < NT; ++i) {
        isum[i] = _mm256_setzero_si256();
        msum[i] = _mm256_setzero_si256();
        for (int q = 0; q < 4; ++q)
          msum[i] = _mm256_add_epi32(msum[i], _mm256_madd_epi16(pairs[q], bcast32(a.s32[i] + 8 * sb + 2 * q)));
      }
      const uint8_t* qh = ph + 256;
      const uint8_t* qs = ph + (FIVE ? 768 : 256);
      const int8_t* x[NT];
      for (int i = 0; i < NT; ++i) x[i] = per_half(a.qs[i] + 256 * sb);
      static_for<8>([&](auto J) {  // sub-block j = 2g + nib: low (nib 0) or high (nib 1) nibbles of group g
        constexpr int j = decltype(J)::value, g = j / 2, nib = j % 2;
        const __m256i sc = bytes_u16<j % 4, j % 4>(j < 4 ? sc_lo : sc_hi);  // sc[j] in both int16 of a row
        __m256i acc[NT];
        for (int i = 0; i < NT; ++i) acc[i] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) {
          const __m256i v = load(qs + 64 * (8 * g + k));
          __m256i w = _mm256_and_si256(nib ? _mm256_srli_epi16(v, 4) : v, low4);
          if (FIVE) {  // bit j of qh becomes bit 4 of the code (16-bit shifts: no bit crosses a byte here)
            const __m256i hv = load(qh + 64 * k);
            __m256i hb;
            if constexpr (j <= 4) {
              hb = _mm256_slli_epi16(hv, 4 - j);
            } else {
              hb = _mm256_srli_epi16(hv, j - 4);
            }
            w = _mm256_or_si256(w, _mm256_and_si256(hb, bit4));
          }
          for (int i = 0; i < NT; ++i) {
            acc[i] = chain(_mm256_add_epi16(acc[i], _mm256_maddubs_epi16(w, bcast32(x[i] + 32 * j + 4 * k))));
          }
          if (FIVE && k == 3) {
            for (int i = 0; i < NT; ++i) {
              isum[i] = chain(_mm256_add_epi32(isum[i], _mm256_madd_epi16(acc[i], sc)));
              acc[i] = _mm256_setzero_si256();
            }
          }
        }
        for (int i = 0; i < NT; ++i) isum[i] = chain(_mm256_add_epi32(isum[i], _mm256_madd_epi16(acc[i], sc)));
      });
      for (int i = 0; i < NT; ++i) {
        const __m256 ad = _mm256_set1_ps(a.d[i][sb]);
        facc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), _mm256_mul_ps(d, ad), facc[i][h]);
        facc[i][h] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum[i]), _mm256_mul_ps(dmin, ad), facc[i][h]);
      }
    }
  }
  for (int i = 0; i < NT; ++i) out[i][0] = facc[i][0], out[i][1] = facc[i][1];
}

// ---------------------------------------------------------------------------------------------------
// Q6_K: 16 sub-blocks of 16, value = d*sc[j]*(q - 32), q = 4 low bits (ql) | 2 high bits (qh) << 4.
// int16 bounds: one vpmaddubsw lane is at most 2 * 63 * 127 = 16002, so two of them (32004) are summed
// before vpmaddwd applies the signed scale. The -32 offset is applied once per super-block through the
// activation's bsum16: isum -= 32 * sum_j sc[j] * bsum16[j].

template <int NT>
void tile_q6(const uint8_t* tile, int64_t nsb, const Acts& a, TileOut<NT>& out) {
  constexpr size_t kMain = 3328;
  const uint8_t* tail = tile + nsb * kMain;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i bits45 = _mm256_set1_epi8(0x30);
  // bsum16 regrouped so that dword 2v holds (bsum16[4v], bsum16[4v+2]) and dword 2v+1 holds
  // (bsum16[4v+1], bsum16[4v+3]): the order of the sign-extended scale pairs E_v, O_v below.
  const __m128i bsel = _mm_setr_epi8(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15);
  __m256 facc[NT][2];
  for (int i = 0; i < NT; ++i) facc[i][0] = facc[i][1] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    const uint8_t* p = tile + sb * kMain;
    prefetch(p + kMain, kMain);
    alignas(32) int32_t bpair[NT][8];
    for (int i = 0; i < NT; ++i) {
      const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.s16[i] + 16 * sb));
      _mm256_store_si256(reinterpret_cast<__m256i*>(bpair[i]), shuffle_lanes(bs, bsel));
    }
    for (int h = 0; h < 2; ++h) {
      const uint8_t* ph = p + 32 * h;
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tail + 32 * sb + 16 * h)));
      // Signed scales as int16: E[v] = (sc[4v], sc[4v+2]), O[v] = (sc[4v+1], sc[4v+3]) per row dword.
      __m256i E[4], O[4];
      for (int v = 0; v < 4; ++v) {
        const __m256i s = load(ph + 3072 + 64 * v);
        E[v] = _mm256_srai_epi16(_mm256_slli_epi16(s, 8), 8);
        O[v] = _mm256_srai_epi16(s, 8);
      }
      __m256i isum[NT];
      for (int i = 0; i < NT; ++i) {
        __m256i corr = _mm256_setzero_si256();
        for (int v = 0; v < 4; ++v) {
          corr = _mm256_add_epi32(corr, _mm256_madd_epi16(E[v], _mm256_set1_epi32(bpair[i][2 * v])));
          corr = _mm256_add_epi32(corr, _mm256_madd_epi16(O[v], _mm256_set1_epi32(bpair[i][2 * v + 1])));
        }
        isum[i] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(corr, 5));
      }
      const int8_t* x[NT];
      for (int i = 0; i < NT; ++i) x[i] = per_half(a.qs[i] + 256 * sb);
      static_for<8>([&](auto HS) {  // 32 columns 128hh + 32s .. +31: sub-blocks j0 = 8hh + 2s and j0 + 1
        constexpr int hh = decltype(HS)::value / 4, s = decltype(HS)::value % 4, j0 = 8 * hh + 2 * s;
        // j0 is even: sc[j0] is int16 lane (j0 % 4) / 2 of E[j0 / 4], sc[j0 + 1] the same lane of O[j0 / 4].
        const __m256i sc0 = dup_i16<(j0 % 4) / 2>(E[j0 / 4]);
        const __m256i sc1 = dup_i16<(j0 % 4) / 2>(O[j0 / 4]);
        auto weights = [&](int k) {
          const __m256i ql = load(ph + 64 * (16 * hh + 8 * (s % 2) + k));
          const __m256i lo = _mm256_and_si256(s >= 2 ? _mm256_srli_epi16(ql, 4) : ql, low4);
          const __m256i qh = load(ph + 2048 + 64 * (8 * hh + k));
          // bits 2s, 2s+1 of qh -> bits 4, 5 (16-bit shifts: no bit crosses a byte here)
          __m256i hs;
          if constexpr (s < 2) {
            hs = _mm256_slli_epi16(qh, 4 - 2 * s);
          } else {
            hs = _mm256_srli_epi16(qh, 2 * s - 4);
          }
          return _mm256_or_si256(lo, _mm256_and_si256(hs, bits45));
        };
#pragma GCC unroll 4
        for (int kp = 0; kp < 4; ++kp) {  // vector pairs 0, 1 cover sub-block j0; pairs 2, 3 cover j0 + 1
          const __m256i w0 = weights(2 * kp), w1 = weights(2 * kp + 1);
          const __m256i sc = kp < 2 ? sc0 : sc1;
          for (int i = 0; i < NT; ++i) {
            const int8_t* xk = x[i] + 128 * hh + 32 * s + 8 * kp;
            const __m256i m =
                _mm256_add_epi16(_mm256_maddubs_epi16(w0, bcast32(xk)), _mm256_maddubs_epi16(w1, bcast32(xk + 4)));
            isum[i] = chain(_mm256_add_epi32(isum[i], _mm256_madd_epi16(m, sc)));
          }
        }
      });
      for (int i = 0; i < NT; ++i) {
        const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(a.d[i][sb]));
        facc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), scale, facc[i][h]);
      }
    }
  }
  for (int i = 0; i < NT; ++i) out[i][0] = facc[i][0], out[i][1] = facc[i][1];
}

// ---------------------------------------------------------------------------------------------------
// Q8_0: blocks of 32, value = d*q. The codes are stored as u8 = q + 128, and vpmaddubsw on those would
// saturate (2 * 255 * 127 > 32767), so the XOR is undone and the sign moved onto the activation:
// |q| * (x * sign(q)) with |q| <= 128 gives at most 2 * 128 * 127 = 32512 per int16 lane. The products are
// then of q itself, so the activation's nsum correction (for u8 codes) is not used.

template <int NT>
void tile_q8(const uint8_t* tile, int64_t nblk, const Acts& a, TileOut<NT>& out) {
  const uint8_t* tail = tile + nblk * 512;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 facc[NT][2];
  for (int i = 0; i < NT; ++i) facc[i][0] = facc[i][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nblk; ++b) {
    const uint8_t* p = tile + b * 512;
    prefetch(p + kStepAhead, 512);
    for (int h = 0; h < 2; ++h) {
      const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tail + 32 * b + 16 * h)));
      __m256i acc[NT];
      const int8_t* x[NT];
      for (int i = 0; i < NT; ++i) {
        acc[i] = _mm256_setzero_si256();
        x[i] = per_half(a.qs[i] + 32 * b);
      }
      for (int k = 0; k < 8; ++k) {
        const __m256i q = _mm256_xor_si256(load(p + 64 * k + 32 * h), flip);
        const __m256i aq = _mm256_abs_epi8(q);
        for (int i = 0; i < NT; ++i) {
          const __m256i sx = _mm256_sign_epi8(bcast32(x[i] + 4 * k), q);
          acc[i] = chain(_mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(aq, sx), ones)));
        }
      }
      for (int i = 0; i < NT; ++i)
        facc[i][h] =
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i]), _mm256_mul_ps(wd, _mm256_set1_ps(a.d[i][b])), facc[i][h]);
    }
  }
  for (int i = 0; i < NT; ++i) out[i][0] = facc[i][0], out[i][1] = facc[i][1];
}

// ---------------------------------------------------------------------------------------------------
// Float weights: exact f32 FMAs on f32 activations.

// F32 and BF16 keep rows in lanes. With few tokens, two chains per (token, row half) hide the FMA latency;
// with more, the tokens themselves give enough independent chains and registers are scarce.
template <int NT, WeightType T>
void tile_float(const uint8_t* tile, int64_t cols, const Acts& a, TileOut<NT>& out) {
  constexpr int C = NT <= 2 ? 2 : 1;
  __m256 f[C][NT][2];
  for (int c = 0; c < C; ++c)
    for (int i = 0; i < NT; ++i) f[c][i][0] = f[c][i][1] = _mm256_setzero_ps();
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  // One packed vector: F32 column g, or BF16 columns 2g (low half of a row dword) and 2g+1 (high half).
  // `ch` must be a constant after unrolling: a variable index into f would put f in memory.
  auto step = [&](int64_t g, int ch) {
    __m256 w[2][2];  // [even/odd column][row half]
    for (int h = 0; h < 2; ++h) {
      const __m256i v = load(tile + 64 * g + 32 * h);
      if (T == WeightType::F32) {
        w[0][h] = _mm256_castsi256_ps(v);
      } else {
        w[0][h] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        w[1][h] = _mm256_castsi256_ps(_mm256_and_si256(v, hi_mask));
      }
    }
    for (int i = 0; i < NT; ++i) {
      if (T == WeightType::F32) {
        const __m256 x = _mm256_set1_ps(a.f[i][g]);
        for (int h = 0; h < 2; ++h) f[ch][i][h] = _mm256_fmadd_ps(w[0][h], x, f[ch][i][h]);
      } else {
        const __m256 xe = _mm256_set1_ps(a.f[i][2 * g]), xo = _mm256_set1_ps(a.f[i][2 * g + 1]);
        for (int h = 0; h < 2; ++h) {
          f[0][i][h] = _mm256_fmadd_ps(w[0][h], xe, f[0][i][h]);
          f[C - 1][i][h] = _mm256_fmadd_ps(w[1][h], xo, f[C - 1][i][h]);
        }
      }
    }
  };
  const int64_t n = T == WeightType::F32 ? cols : cols / 2;
  int64_t g = 0;
  for (; g + 8 <= n; g += 8) {
    prefetch(tile + 64 * g + kStepAhead, 512);
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) step(g + u, u % C);
  }
  for (; g < n; ++g) step(g, 0);
  for (int i = 0; i < NT; ++i)
    for (int h = 0; h < 2; ++h) out[i][h] = C == 2 ? _mm256_add_ps(f[0][i][h], f[C - 1][i][h]) : f[0][i][h];
}

// F16: vcvtph2ps converts 8 consecutive halves, so each 16-byte quarter of a packed vector becomes
// [r c0, r c1, r+1 c0, r+1 c1, ...] for 4 rows and is multiplied by the broadcast column pair (x0, x1).
// The column pairs are summed once at the end (vhaddps), which avoids shuffling every weight vector.
// Four accumulators per token: at most 2 tokens per pass keep them in registers.
template <int NT>
void f16_pass(const uint8_t* tile, int64_t cols, const float* const* x, __m256 (*out)[2]) {
  __m256 acc[NT][4];
  for (int i = 0; i < NT; ++i)
    for (int q = 0; q < 4; ++q) acc[i][q] = _mm256_setzero_ps();
  auto step = [&](int64_t g) {
    __m256 w[4];
    for (int q = 0; q < 4; ++q)
      w[q] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + 64 * g + 16 * q)));
    for (int i = 0; i < NT; ++i) {
      double pair;
      std::memcpy(&pair, x[i] + 2 * g, 8);
      const __m256 xp = _mm256_castpd_ps(_mm256_set1_pd(pair));
      for (int q = 0; q < 4; ++q) acc[i][q] = _mm256_fmadd_ps(w[q], xp, acc[i][q]);
    }
  };
  const int64_t n = cols / 2;
  int64_t g = 0;
  for (; g + 8 <= n; g += 8) {
    prefetch(tile + 64 * g + kStepAhead, 512);
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) step(g + u);
  }
  for (; g < n; ++g) step(g);
  for (int i = 0; i < NT; ++i) {
    for (int h = 0; h < 2; ++h) {
      // hadd of rows (0-3, 4-7) gives [r0 r1 r4 r5 | r2 r3 r6 r7]; swap the middle 64-bit quarters.
      const __m256 s = _mm256_hadd_ps(acc[i][2 * h], acc[i][2 * h + 1]);
      out[i][h] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(s), 0xD8));
    }
  }
}

template <int NT>
void tile_f16(const uint8_t* tile, int64_t cols, const Acts& a, TileOut<NT>& out) {
  if constexpr (NT <= 2) {
    f16_pass<NT>(tile, cols, a.f, out);
  } else {
    f16_pass<2>(tile, cols, a.f, out);
    f16_pass<NT - 2>(tile, cols, a.f + 2, out + 2);
  }
}

// ---------------------------------------------------------------------------------------------------
// Driver: tiles outer (a tile's weights stay in L1/L2 while token groups reuse them), tokens inner.

// One micro-kernel per type; no default, so -Wswitch names a type added without one.
template <int NT>
void tile_dispatch(WeightType t, const uint8_t* tile, int64_t cols, const Acts& a, TileOut<NT>& out) {
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
      tile_f16<NT>(tile, cols, a, out);
      return;
    case WeightType::BF16:
      tile_float<NT, WeightType::BF16>(tile, cols, a, out);
      return;
  }
}

// Writes 8 results to dst (n of them valid: the last tile may be partial), or adds scale * them.
inline void store8(float* dst, __m256 v, const float* scale, int64_t n) {
  if (n >= 8) {
    if (scale != nullptr) v = _mm256_fmadd_ps(v, _mm256_set1_ps(*scale), _mm256_loadu_ps(dst));
    _mm256_storeu_ps(dst, v);
  } else if (n > 0) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane);
    if (scale != nullptr) v = _mm256_fmadd_ps(v, _mm256_set1_ps(*scale), _mm256_maskload_ps(dst, mask));
    _mm256_maskstore_ps(dst, mask, v);
  }
}

template <int NT>
void run_group(WeightType t, const uint8_t* tile, int64_t cols, const uint8_t* const* act, int64_t i0, int64_t valid,
               const GemmOut& o, int64_t off) {
  const Acts a = split_act_rows<kMaxTokens>(t, act + i0, NT, cols);
  __m256 v[NT][2] = {};  // tile_dispatch writes it for every WeightType; zeroed for any other value
  tile_dispatch<NT>(t, tile, cols, a, v);
  for (int i = 0; i < NT; ++i) {  // in token order: two tokens may share an output row
    float* dst = o.rows[i0 + i] + o.col0 + off;
    const float* scale = o.scale != nullptr ? o.scale + i0 + i : nullptr;
    store8(dst, v[i][0], scale, valid);
    store8(dst + 8, v[i][1], scale, valid - 8);
  }
}

void gemm_avx2(WeightType t, const uint8_t* packed, int64_t rows, int64_t cols, int64_t tile0, int64_t n_tiles,
               const uint8_t* const* act, int64_t n_tokens, const GemmOut& out) {
  const size_t tb = tile_bytes(t, cols);
  for (int64_t tile = tile0; tile < tile0 + n_tiles; ++tile) {
    const uint8_t* tp = packed + tile * tb;
    const int64_t valid = std::min<int64_t>(kTileRows, rows - tile * kTileRows);
    const int64_t off = (tile - tile0) * kTileRows;
    for_token_groups<kMaxTokens>(n_tokens,
                                 [&](auto NT, int64_t i0) { run_group<NT>(t, tp, cols, act, i0, valid, out, off); });
  }
}

void activate_avx2(const ActParams& p, float* x, const float* up, int64_t n) { act_impl::activate(p, x, up, n); }

}  // namespace

const IsaKernels& avx2_kernels() {
  static const IsaKernels k{quantize_act_cols_avx2, gemm_avx2, activate_avx2};
  return k;
}

}  // namespace ktinject
