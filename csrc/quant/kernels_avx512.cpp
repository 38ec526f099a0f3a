// AVX-512 (F/BW/VL/DQ + VNNI) kernels. Compiled with AVX-512 target flags; only called when
// isa_available(Isa::Avx512).
//
// Quantized weights use an outer-product micro-kernel: 16 weight rows are transposed so that zmm lane r
// holds 4 consecutive codes of row r, and each activation dword (4 int8 of one token) is broadcast to all
// lanes. One vpdpbusd then does 64 multiply-adds for 16 rows x 4 columns, every lane of an accumulator
// belongs to one row, and a 32-element sub-block is 8 vpdpbusd into one register, so its 6-bit scale is
// applied with one multiply per 8 dot instructions (a row-major layout would need one per instruction).
// The transpose is paid once per 16 rows x 256 columns and reused by every token of the call.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "quant/act_format.h"
#include "quant/isa_kernels.h"
#include "quant/q4_k.h"
#include "quant/q5_k.h"
#include "quant/q6_k.h"
#include "quant/q8_0.h"

namespace ktinject {
namespace {

constexpr int kRows = 16;        // rows per transposed tile (one per zmm lane)
constexpr int kTokenBlock = 64;  // tokens whose partial sums stay in the stack buffer
constexpr int kTokenTile = 6;    // tokens per micro-kernel call (accumulators held in registers)

// ---------------------------------------------------------------------------------------------------
// Activation quantization (must produce exactly the scalar kernel's bytes).

inline float max_abs_256(const float* x, int n16) {
  __m512 m = _mm512_setzero_ps();
  for (int i = 0; i < n16; ++i) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + 16 * i)));
  return _mm512_reduce_max_ps(m);
}

// 16 floats -> 16 int8 codes (round half to even, as the scalar nearbyint); returns their sum.
inline int quantize16(const float* x, __m512 id, int8_t* q) {
  __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), id));
  v = _mm512_max_epi32(_mm512_min_epi32(v, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(v));
  return _mm512_reduce_add_epi32(v);
}

void quantize_act_avx512(WeightType t, const float* x, int64_t n_tokens, int64_t cols, uint8_t* dst) {
  const ActLayout L = act_layout(t, cols);
  for (int64_t tok = 0; tok < n_tokens; ++tok, x += cols, dst += L.bytes) {
    int8_t* qs = reinterpret_cast<int8_t*>(dst);
    if (t == WeightType::Q4_K || t == WeightType::Q5_K || t == WeightType::Q6_K) {
      float* d = reinterpret_cast<float*>(dst + L.d_off);
      int16_t* bsum16 = reinterpret_cast<int16_t*>(dst + L.sum_off);
      int16_t* bsum32 = reinterpret_cast<int16_t*>(dst + L.sum32_off);
      for (int64_t sb = 0; sb < cols / 256; ++sb) {
        const float amax = max_abs_256(x + 256 * sb, 16);
        const __m512 id = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        d[sb] = amax / 127.0f;
        for (int g = 0; g < 16; ++g)
          bsum16[16 * sb + g] = static_cast<int16_t>(quantize16(x + 256 * sb + 16 * g, id, qs + 256 * sb + 16 * g));
      }
      for (int64_t g = 0; g < cols / 32; ++g) bsum32[g] = static_cast<int16_t>(bsum16[2 * g] + bsum16[2 * g + 1]);
    } else if (t == WeightType::Q8_0) {
      float* d = reinterpret_cast<float*>(dst + L.d_off);
      float* sum = reinterpret_cast<float*>(dst + L.sum_off);
      for (int64_t b = 0; b < cols / 32; ++b) {
        const float amax = max_abs_256(x + 32 * b, 2);
        const __m512 id = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        d[b] = amax / 127.0f;
        const int s = quantize16(x + 32 * b, id, qs + 32 * b) + quantize16(x + 32 * b + 16, id, qs + 32 * b + 16);
        sum[b] = 128.0f * (d[b] * static_cast<float>(s));
      }
    } else {
      std::memcpy(dst, x, cols * sizeof(float));
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Tile preparation: transpose 16 rows so that lane r of vector w holds dword w of row r.

inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // r[4i+e], 128-bit chunk q, now holds rows 4i..4i+3 of column 4q+e.
  for (int e = 0; e < 4; ++e) {
    const __m512i a = _mm512_shuffle_i32x4(r[e], r[4 + e], 0x88);
    const __m512i b = _mm512_shuffle_i32x4(r[e], r[4 + e], 0xDD);
    const __m512i c = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0x88);
    const __m512i d = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0xDD);
    t[e] = _mm512_shuffle_i32x4(a, c, 0x88);
    t[8 + e] = _mm512_shuffle_i32x4(a, c, 0xDD);
    t[4 + e] = _mm512_shuffle_i32x4(b, d, 0x88);
    t[12 + e] = _mm512_shuffle_i32x4(b, d, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Loads 64 bytes at byte offset `off` of each of the 16 blocks and transposes them: out[w] lane r is
// dword w of row r. `nbytes` < 64 reads only that many bytes (the rest read as zero).
inline void load_transposed(const uint8_t* const blk[kRows], int off, int nbytes, __m512i out[16]) {
  const __mmask64 mask = nbytes >= 64 ? ~__mmask64{0} : ((__mmask64{1} << nbytes) - 1);
  for (int r = 0; r < kRows; ++r) out[r] = _mm512_maskz_loadu_epi8(mask, blk[r] + off);
  transpose16x16(out);
}

// Dword at byte offset `off` of each row's block, lane r = row r.
inline __m512i gather_dword(const __m512i& row_off, const uint8_t* base, int off) {
  return _mm512_i32gather_epi32(row_off, base + off, 1);
}

inline __m512 fp16_lo_to_ps(__m512i v) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v)); }

inline __m512i bcast32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Transposed weights of 16 rows x 256 columns of a K-quant super-block, as u8 codes (0..63).
struct KTile {
  __m512i w[64];      // w[8*j + k]: lane r = codes of row r, columns 32*j + 4*k .. +3
  __m512i scale[16];  // Q4_K/Q5_K: scale[j] (j < 8) = 6-bit sub-block scale; Q6_K: 16 int8 scales
  __m512i pair[8];    // int16 pairs for the offset term: Q4_K/Q5_K (m[2p], m[2p+1]); Q6_K (sc[2p], sc[2p+1])
  __m512 d;           // super-block scale of each row
  __m512 dmin;        // Q4_K/Q5_K: scale of the mins
};

inline __m512i byte_of(__m512i v, int byte) { return _mm512_and_si512(_mm512_srli_epi32(v, 8 * byte), _mm512_set1_epi32(255)); }

void prepare_k45_scales(const __m512i& row_off, const uint8_t* base, KTile& t) {
  const __m512i h0 = gather_dword(row_off, base, 0);   // d | dmin << 16
  const __m512i s0 = gather_dword(row_off, base, 4);   // scales[0..3]
  const __m512i s1 = gather_dword(row_off, base, 8);   // scales[4..7]
  const __m512i s2 = gather_dword(row_off, base, 12);  // scales[8..11]
  const __m512i c63 = _mm512_set1_epi32(63), c15 = _mm512_set1_epi32(15), c48 = _mm512_set1_epi32(48);
  __m512i m[8];
  for (int j = 0; j < 4; ++j) {
    const __m512i b0 = byte_of(s0, j), b1 = byte_of(s1, j), b2 = byte_of(s2, j);
    t.scale[j] = _mm512_and_si512(b0, c63);
    m[j] = _mm512_and_si512(b1, c63);
    t.scale[j + 4] = _mm512_or_si512(_mm512_and_si512(b2, c15), _mm512_and_si512(_mm512_srli_epi32(b0, 2), c48));
    m[j + 4] = _mm512_or_si512(_mm512_srli_epi32(b2, 4), _mm512_and_si512(_mm512_srli_epi32(b1, 2), c48));
  }
  for (int p = 0; p < 4; ++p) t.pair[p] = _mm512_or_si512(m[2 * p], _mm512_slli_epi32(m[2 * p + 1], 16));
  t.d = fp16_lo_to_ps(h0);
  t.dmin = fp16_lo_to_ps(_mm512_srli_epi32(h0, 16));
}

void prepare_q4_k(const uint8_t* const blk[kRows], const __m512i& row_off, const uint8_t* base, KTile& t) {
  const __m512i lo = _mm512_set1_epi8(15);
  for (int half = 0; half < 2; ++half) {
    __m512i v[16];
    load_transposed(blk, 16 + 64 * half, 64, v);
    for (int i = 0; i < 16; ++i) {  // qs dword 16*half + i: group g = dword / 8, k = dword % 8
      const int g = (16 * half + i) / 8, k = i % 8;
      t.w[8 * (2 * g) + k] = _mm512_and_si512(v[i], lo);
      t.w[8 * (2 * g + 1) + k] = _mm512_and_si512(_mm512_srli_epi32(v[i], 4), lo);
    }
  }
  prepare_k45_scales(row_off, base, t);
}

void prepare_q5_k(const uint8_t* const blk[kRows], const __m512i& row_off, const uint8_t* base, KTile& t) {
  const __m512i lo = _mm512_set1_epi8(15), bit4 = _mm512_set1_epi8(16);
  __m512i qh[8], v[16];
  load_transposed(blk, 16, 64, v);  // qh dwords 0..7, then qs dwords 0..7
  for (int k = 0; k < 8; ++k) qh[k] = v[k];
  auto emit = [&](int qs_dword, const __m512i& q) {
    const int g = qs_dword / 8, k = qs_dword % 8;
    for (int h = 0; h < 2; ++h) {
      const int j = 2 * g + h;
      const __m512i nib = h == 0 ? _mm512_and_si512(q, lo) : _mm512_and_si512(_mm512_srli_epi32(q, 4), lo);
      const __m512i hb = j <= 4 ? _mm512_slli_epi32(qh[k], 4 - j) : _mm512_srli_epi32(qh[k], j - 4);
      t.w[8 * j + k] = _mm512_ternarylogic_epi32(nib, hb, bit4, 0xF8);  // nib | (hb & 0x10)
    }
  };
  for (int i = 0; i < 8; ++i) emit(i, v[8 + i]);
  load_transposed(blk, 80, 64, v);  // qs dwords 8..23
  for (int i = 0; i < 16; ++i) emit(8 + i, v[i]);
  load_transposed(blk, 144, 32, v);  // qs dwords 24..31
  for (int i = 0; i < 8; ++i) emit(24 + i, v[i]);
  prepare_k45_scales(row_off, base, t);
}

void prepare_q6_k(const uint8_t* const blk[kRows], const __m512i& row_off, const uint8_t* base, KTile& t) {
  const __m512i lo = _mm512_set1_epi8(15), hi2 = _mm512_set1_epi8(48);
  __m512i ql[32], qh[16];
  load_transposed(blk, 0, 64, ql);
  load_transposed(blk, 64, 64, ql + 16);
  load_transposed(blk, 128, 64, qh);
  for (int e = 0; e < 64; ++e) {  // element dword e covers elements 4e..4e+3 = 128*h + 4*rw ..
    const int h = e / 32, rw = e % 32;
    const __m512i l = ql[16 * h + rw % 16];
    const int s = rw / 16, k = rw / 8 % 4;
    const __m512i nib = s == 0 ? _mm512_and_si512(l, lo) : _mm512_and_si512(_mm512_srli_epi32(l, 4), lo);
    const __m512i q = qh[8 * h + rw % 8];
    const __m512i hb = k <= 2 ? _mm512_slli_epi32(q, 4 - 2 * k) : _mm512_srli_epi32(q, 2);
    t.w[e] = _mm512_ternarylogic_epi32(nib, hb, hi2, 0xF8);  // nib | (hb & 0x30)
  }
  for (int q = 0; q < 4; ++q) {
    const __m512i s = gather_dword(row_off, base, 192 + 4 * q);
    for (int b = 0; b < 4; ++b) t.scale[4 * q + b] = _mm512_srai_epi32(_mm512_slli_epi32(s, 24 - 8 * b), 24);
  }
  for (int p = 0; p < 8; ++p)
    t.pair[p] = _mm512_or_si512(_mm512_and_si512(t.scale[2 * p], _mm512_set1_epi32(0xFFFF)),
                                _mm512_slli_epi32(t.scale[2 * p + 1], 16));
  t.d = fp16_lo_to_ps(_mm512_srli_epi32(gather_dword(row_off, base, 206), 16));
}

// ---------------------------------------------------------------------------------------------------
// Micro-kernels: C tokens x 16 rows of one super-block, accumulating into acc[c] (f32, lane = row).

struct ActRow {
  const int8_t* qs;
  const float* d;
  const int16_t* bsum16;
  const int16_t* bsum32;
  const float* sum;
};

template <int C>
inline void kernel_q4_q5(const KTile& t, const ActRow* a, int64_t sb, __m512* acc) {
  __m512i isum[C];
  for (int c = 0; c < C; ++c) isum[c] = _mm512_setzero_si512();
  for (int j = 0; j < 8; ++j) {
    __m512i w[8];
    for (int k = 0; k < 8; ++k) w[k] = t.w[8 * j + k];
    for (int c = 0; c < C; ++c) {
      const int8_t* x = a[c].qs + 256 * sb + 32 * j;
      __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], bcast32(x));
      for (int k = 1; k < 8; ++k) s = _mm512_dpbusd_epi32(s, w[k], bcast32(x + 4 * k));
      isum[c] = _mm512_add_epi32(isum[c], _mm512_mullo_epi32(s, t.scale[j]));
    }
  }
  for (int c = 0; c < C; ++c) {
    const int16_t* bs = a[c].bsum32 + 8 * sb;
    __m512i msum = _mm512_madd_epi16(t.pair[0], bcast32(bs));
    for (int p = 1; p < 4; ++p) msum = _mm512_dpwssd_epi32(msum, t.pair[p], bcast32(bs + 2 * p));
    const __m512 v = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum), t.dmin, _mm512_mul_ps(_mm512_cvtepi32_ps(isum[c]), t.d));
    acc[c] = _mm512_fmadd_ps(v, _mm512_set1_ps(a[c].d[sb]), acc[c]);
  }
}

template <int C>
inline void kernel_q6(const KTile& t, const ActRow* a, int64_t sb, __m512* acc) {
  __m512i isum[C];
  for (int c = 0; c < C; ++c) isum[c] = _mm512_setzero_si512();
  for (int j = 0; j < 16; j += 2) {
    __m512i w[8];
    for (int k = 0; k < 8; ++k) w[k] = t.w[4 * j + k];
    for (int c = 0; c < C; ++c) {
      const int8_t* x = a[c].qs + 256 * sb + 16 * j;
      __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], bcast32(x));
      __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[4], bcast32(x + 16));
      for (int k = 1; k < 4; ++k) {
        s0 = _mm512_dpbusd_epi32(s0, w[k], bcast32(x + 4 * k));
        s1 = _mm512_dpbusd_epi32(s1, w[4 + k], bcast32(x + 16 + 4 * k));
      }
      isum[c] = _mm512_add_epi32(isum[c], _mm512_mullo_epi32(s0, t.scale[j]));
      isum[c] = _mm512_add_epi32(isum[c], _mm512_mullo_epi32(s1, t.scale[j + 1]));
    }
  }
  for (int c = 0; c < C; ++c) {
    // codes are q + 32: subtract 32 * sum_j sc[j] * bsum16[j]
    const int16_t* bs = a[c].bsum16 + 16 * sb;
    __m512i off = _mm512_madd_epi16(t.pair[0], bcast32(bs));
    for (int p = 1; p < 8; ++p) off = _mm512_dpwssd_epi32(off, t.pair[p], bcast32(bs + 2 * p));
    const __m512i v = _mm512_sub_epi32(isum[c], _mm512_slli_epi32(off, 5));
    acc[c] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v), t.d), _mm512_set1_ps(a[c].d[sb]), acc[c]);
  }
}

// ---------------------------------------------------------------------------------------------------
// Driver shared by the K-quants: 16-row groups, super-blocks, token tiles.

template <typename Prepare, typename Kernel>
void gemm_k_tiled(size_t block_size, Prepare prepare, Kernel kernel, const uint8_t* W, int64_t row0, int64_t n_rows,
                  int64_t cols, const uint8_t* act, int64_t n_tokens, float* out, int64_t out_stride,
                  WeightType t) {
  const size_t rb = row_bytes(t, cols);
  const ActLayout L = act_layout(t, cols);
  const int64_t nsb = cols / 256;
  alignas(64) KTile tile;
  alignas(64) __m512 part[kTokenBlock];
  ActRow rows[kTokenBlock];
  for (int64_t t0 = 0; t0 < n_tokens; t0 += kTokenBlock) {
    const int nt = static_cast<int>(std::min<int64_t>(kTokenBlock, n_tokens - t0));
    for (int c = 0; c < nt; ++c) {
      const uint8_t* p = act + (t0 + c) * L.bytes;
      rows[c] = {reinterpret_cast<const int8_t*>(p), reinterpret_cast<const float*>(p + L.d_off),
                 reinterpret_cast<const int16_t*>(p + L.sum_off), reinterpret_cast<const int16_t*>(p + L.sum32_off),
                 nullptr};
    }
    for (int64_t g = 0; g < n_rows; g += kRows) {
      const int nr = static_cast<int>(std::min<int64_t>(kRows, n_rows - g));
      const uint8_t* base = W + (row0 + g) * rb;
      alignas(64) int32_t offs[kRows];
      for (int r = 0; r < kRows; ++r) offs[r] = static_cast<int32_t>(std::min(r, nr - 1) * rb);
      const __m512i row_off = _mm512_load_si512(offs);
      for (int c = 0; c < nt; ++c) part[c] = _mm512_setzero_ps();
      for (int64_t sb = 0; sb < nsb; ++sb) {
        const uint8_t* blk[kRows];
        for (int r = 0; r < kRows; ++r) blk[r] = base + offs[r] + sb * block_size;
        prepare(blk, row_off, base + sb * block_size, tile);
        int c = 0;
        for (; c + kTokenTile <= nt; c += kTokenTile) {
          __m512 acc[kTokenTile];
          for (int i = 0; i < kTokenTile; ++i) acc[i] = part[c + i];
          kernel.template operator()<kTokenTile>(tile, rows + c, sb, acc);
          for (int i = 0; i < kTokenTile; ++i) part[c + i] = acc[i];
        }
        for (; c < nt; ++c) kernel.template operator()<1>(tile, rows + c, sb, part + c);
      }
      const __mmask16 m = static_cast<__mmask16>((1u << nr) - 1);
      for (int c = 0; c < nt; ++c) _mm512_mask_storeu_ps(out + (t0 + c) * out_stride + g, m, part[c]);
    }
  }
}

struct Q45Kernel {
  template <int C>
  void operator()(const KTile& t, const ActRow* a, int64_t sb, __m512* acc) const { kernel_q4_q5<C>(t, a, sb, acc); }
};
struct Q6Kernel {
  template <int C>
  void operator()(const KTile& t, const ActRow* a, int64_t sb, __m512* acc) const { kernel_q6<C>(t, a, sb, acc); }
};

// ---------------------------------------------------------------------------------------------------
// Q8_0: same scheme with 8 blocks of 32 per tile; codes are made unsigned (+128, an xor) and the offset
// 128 * sum(act codes) is removed with the activation's precomputed `sum` (128 * d * sum of codes).

struct Q8Tile {
  __m512i w[64];
  __m512 d[8];
};

void prepare_q8_0(const uint8_t* const blk[kRows], const __m512i& row_off, const uint8_t* base, int nblk, Q8Tile& t) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int pair = 0; 2 * pair < nblk; ++pair) {
    __m512i v[16];
    const int b0 = 2 * pair;
    const bool two = b0 + 1 < nblk;
    for (int r = 0; r < kRows; ++r) {
      const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk[r] + 34 * b0 + 2));
      const __m256i hi = two ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk[r] + 34 * (b0 + 1) + 2))
                             : _mm256_setzero_si256();
      v[r] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    }
    transpose16x16(v);
    for (int i = 0; i < 16; ++i) t.w[16 * pair + i] = _mm512_xor_si512(v[i], flip);
  }
  for (int b = 0; b < nblk; ++b) t.d[b] = fp16_lo_to_ps(gather_dword(row_off, base, 34 * b));
}

template <int C>
inline void kernel_q8(const Q8Tile& t, const ActRow* a, int64_t b0, int nblk, __m512* acc) {
  for (int b = 0; b < nblk; ++b) {
    __m512i w[8];
    for (int k = 0; k < 8; ++k) w[k] = t.w[8 * b + k];
    for (int c = 0; c < C; ++c) {
      const int8_t* x = a[c].qs + 32 * (b0 + b);
      __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], bcast32(x));
      for (int k = 1; k < 8; ++k) s = _mm512_dpbusd_epi32(s, w[k], bcast32(x + 4 * k));
      const __m512 v = _mm512_fmsub_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(a[c].d[b0 + b]),
                                       _mm512_set1_ps(a[c].sum[b0 + b]));
      acc[c] = _mm512_fmadd_ps(v, t.d[b], acc[c]);
    }
  }
}

void gemm_q8_0(const uint8_t* W, int64_t row0, int64_t n_rows, int64_t cols, const uint8_t* act, int64_t n_tokens,
               float* out, int64_t out_stride) {
  const size_t rb = row_bytes(WeightType::Q8_0, cols);
  const ActLayout L = act_layout(WeightType::Q8_0, cols);
  const int64_t nb = cols / 32;
  alignas(64) Q8Tile tile;
  alignas(64) __m512 part[kTokenBlock];
  ActRow rows[kTokenBlock];
  for (int64_t t0 = 0; t0 < n_tokens; t0 += kTokenBlock) {
    const int nt = static_cast<int>(std::min<int64_t>(kTokenBlock, n_tokens - t0));
    for (int c = 0; c < nt; ++c) {
      const uint8_t* p = act + (t0 + c) * L.bytes;
      rows[c] = {reinterpret_cast<const int8_t*>(p), reinterpret_cast<const float*>(p + L.d_off), nullptr, nullptr,
                 reinterpret_cast<const float*>(p + L.sum_off)};
    }
    for (int64_t g = 0; g < n_rows; g += kRows) {
      const int nr = static_cast<int>(std::min<int64_t>(kRows, n_rows - g));
      const uint8_t* base = W + (row0 + g) * rb;
      alignas(64) int32_t offs[kRows];
      for (int r = 0; r < kRows; ++r) offs[r] = static_cast<int32_t>(std::min(r, nr - 1) * rb);
      const __m512i row_off = _mm512_load_si512(offs);
      for (int c = 0; c < nt; ++c) part[c] = _mm512_setzero_ps();
      for (int64_t b0 = 0; b0 < nb; b0 += 8) {
        const int nblk = static_cast<int>(std::min<int64_t>(8, nb - b0));
        const uint8_t* blk[kRows];
        for (int r = 0; r < kRows; ++r) blk[r] = base + offs[r] + b0 * 34;
        prepare_q8_0(blk, row_off, base + b0 * 34, nblk, tile);
        int c = 0;
        for (; c + kTokenTile <= nt; c += kTokenTile) {
          __m512 acc[kTokenTile];
          for (int i = 0; i < kTokenTile; ++i) acc[i] = part[c + i];
          kernel_q8<kTokenTile>(tile, rows + c, b0, nblk, acc);
          for (int i = 0; i < kTokenTile; ++i) part[c + i] = acc[i];
        }
        for (; c < nt; ++c) kernel_q8<1>(tile, rows + c, b0, nblk, part + c);
      }
      const __mmask16 m = static_cast<__mmask16>((1u << nr) - 1);
      for (int c = 0; c < nt; ++c) _mm512_mask_storeu_ps(out + (t0 + c) * out_stride + g, m, part[c]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Float weights: R rows x C tokens of f32 FMAs, weights converted once per load and reused by C tokens.

template <WeightType T>
inline __m512 load_w(const uint8_t* row, int64_t k, __mmask16 m) {
  if constexpr (T == WeightType::F32) {
    return _mm512_maskz_loadu_ps(m, reinterpret_cast<const float*>(row) + k);
  } else if constexpr (T == WeightType::F16) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(row) + k));
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(row) + k);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <WeightType T, int R, int C>
void kernel_float(const uint8_t* const* w, const float* const* x, int64_t cols, float* out, int64_t out_stride) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < cols; k += 16) {
    const __mmask16 m = cols - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (cols - k)) - 1);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_w<T>(w[r], k, m);
    for (int c = 0; c < C; ++c) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x[c] + k);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[c * out_stride + r] = _mm512_reduce_add_ps(acc[r][c]);
}

template <WeightType T, int R>
void float_rows(const uint8_t* const* w, const float* const* x, int nt, int64_t cols, float* out, int64_t out_stride) {
  constexpr int CT = 6;
  int c = 0;
  for (; c + CT <= nt; c += CT) kernel_float<T, R, CT>(w, x + c, cols, out + c * out_stride, out_stride);
  switch (nt - c) {
    case 5: kernel_float<T, R, 5>(w, x + c, cols, out + c * out_stride, out_stride); break;
    case 4: kernel_float<T, R, 4>(w, x + c, cols, out + c * out_stride, out_stride); break;
    case 3: kernel_float<T, R, 3>(w, x + c, cols, out + c * out_stride, out_stride); break;
    case 2: kernel_float<T, R, 2>(w, x + c, cols, out + c * out_stride, out_stride); break;
    case 1: kernel_float<T, R, 1>(w, x + c, cols, out + c * out_stride, out_stride); break;
    default: break;
  }
}

template <WeightType T>
void gemm_float(const uint8_t* W, int64_t row0, int64_t n_rows, int64_t cols, const uint8_t* act, int64_t n_tokens,
                float* out, int64_t out_stride) {
  const size_t rb = row_bytes(T, cols);
  const size_t ab = act_row_bytes(T, cols);
  constexpr int R = 4;
  const float* x[kTokenBlock];
  for (int64_t t0 = 0; t0 < n_tokens; t0 += kTokenBlock) {
    const int nt = static_cast<int>(std::min<int64_t>(kTokenBlock, n_tokens - t0));
    for (int c = 0; c < nt; ++c) x[c] = reinterpret_cast<const float*>(act + (t0 + c) * ab);
    float* o = out + t0 * out_stride;
    int64_t r = 0;
    for (; r + R <= n_rows; r += R) {
      const uint8_t* w[R];
      for (int i = 0; i < R; ++i) w[i] = W + (row0 + r + i) * rb;
      float_rows<T, R>(w, x, nt, cols, o + r, out_stride);
    }
    for (; r < n_rows; ++r) {
      const uint8_t* w[1] = {W + (row0 + r) * rb};
      float_rows<T, 1>(w, x, nt, cols, o + r, out_stride);
    }
  }
}

void gemm_avx512(WeightType t, const uint8_t* W, int64_t row0, int64_t n_rows, int64_t cols, const uint8_t* act,
                 int64_t n_tokens, float* out, int64_t out_stride) {
  switch (t) {
    case WeightType::Q4_K:
      gemm_k_tiled(sizeof(BlockQ4_K), prepare_q4_k, Q45Kernel{}, W, row0, n_rows, cols, act, n_tokens, out, out_stride, t);
      break;
    case WeightType::Q5_K:
      gemm_k_tiled(sizeof(BlockQ5_K), prepare_q5_k, Q45Kernel{}, W, row0, n_rows, cols, act, n_tokens, out, out_stride, t);
      break;
    case WeightType::Q6_K:
      gemm_k_tiled(sizeof(BlockQ6_K), prepare_q6_k, Q6Kernel{}, W, row0, n_rows, cols, act, n_tokens, out, out_stride, t);
      break;
    case WeightType::Q8_0:
      gemm_q8_0(W, row0, n_rows, cols, act, n_tokens, out, out_stride);
      break;
    case WeightType::F32:
      gemm_float<WeightType::F32>(W, row0, n_rows, cols, act, n_tokens, out, out_stride);
      break;
    case WeightType::F16:
      gemm_float<WeightType::F16>(W, row0, n_rows, cols, act, n_tokens, out, out_stride);
      break;
    case WeightType::BF16:
      gemm_float<WeightType::BF16>(W, row0, n_rows, cols, act, n_tokens, out, out_stride);
      break;
  }
}

}  // namespace

const IsaKernels& avx512_kernels() {
  static const IsaKernels k{quantize_act_avx512, gemm_avx512};
  return k;
}

}  // namespace ktinject
