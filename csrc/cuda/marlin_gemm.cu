// ktinject's Marlin int4 GEMM: y = x @ W.T + bias with W in Marlin's 4-bit tile layout (see marlin_gemm.h).
//
// Design (our own; the layout is Marlin's so that the B fragments arrive pre-shuffled):
//   * A thread block owns one 64-column tile of N, one chunk of up to 64 rows of M and one slice of K
//     (split-K). Its 4 warps take turns over the 16-row k-steps of the slice (kUnroll consecutive rows each).
//   * Per k-step a warp loads one 512-byte tile row with a single coalesced 16-byte load per lane: word j of
//     lane l is exactly lane l's B fragment for the 16-column sub-tile j of an mma.m16n8k16 (both 8-column
//     halves). The int4 codes are expanded in registers: (w >> s) & 0x000F000F | exponent bits gives a pair of
//     16-bit floats 1024+q (fp16) or 128+q (bf16), one subtraction makes them q-8 exactly, one multiply applies
//     the group scale (grouped layout: 8 scales per lane in one 16-byte load, the reason for Marlin's scale
//     permutation). Activations are read straight into A fragments (they are small and L1/L2 resident at the
//     decode batch sizes this kernel is for).
//   * The warps' fp32 accumulators are summed in shared memory. With split-K, each block stores its partial
//     tile in the workspace; the last block to arrive (a per-tile counter) adds the partials in split order
//     (deterministic), applies per-channel scales and bias, writes y and resets the counter.
// Weights are streamed once (ld.global.nc, no L1 allocation); K is split until the grid fills one wave of
// resident blocks, because at batch 1-16 the kernel is bound by how many weight bytes are in flight.
// Not verified on a GPU yet: tests/operators/test_marlin_cuda.py replays this dataflow on the CPU, and its gpu
// tests plus benchmarks/run_gpu.sh check and time the real thing.

#include "marlin_gemm.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace ktinject {
namespace marlin {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileN = 64;  // columns per block: one tile of the layout
constexpr int kTileK = 16;  // one mma k-step, one row of qweight
constexpr int kMaxSplits = 16;
constexpr int kRedStride = kTileN + 8;  // shared reduction row stride: 2-way bank conflicts at most

// Rows of qweight a warp keeps in flight per step (16 bytes per lane each): as many as the registers allow, since
// at small M the kernel is bound by how many weight bytes are in flight; the accumulators of larger M chunks
// take the registers back.
__host__ __device__ constexpr int unroll_for(int mb) { return mb == 1 ? 8 : mb == 2 ? 4 : 2; }

template <typename T>
struct Half;

template <>
struct Half<__half> {
  using T2 = __half2;
  static constexpr uint32_t kExponent = 0x64006400u;  // 1024.0 in both halves; OR a code q in: 1024 + q
  static constexpr uint32_t kOffset = 0x64086408u;    // 1032.0 = 1024 + zero point 8
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Half<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kExponent = 0x43004300u;  // 128.0: bf16's 7 mantissa bits make 128 + q exact
  static constexpr uint32_t kOffset = 0x43084308u;    // 136.0 = 128 + zero point 8
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <typename T2>
__device__ __forceinline__ T2 as_pair(uint32_t bits) {
  T2 v;
  memcpy(&v, &bits, sizeof(v));
  return v;
}

template <typename T2>
__device__ __forceinline__ uint32_t as_bits(T2 v) {
  uint32_t bits;
  memcpy(&bits, &v, sizeof(bits));
  return bits;
}

// Nibbles 0 and 4 of `word` (bits 0-3 and 16-19) as the pair (q0 - 8, q4 - 8): exact in both 16-bit types.
template <typename T>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t word) {
  using H = Half<T>;
  using T2 = typename H::T2;
  const uint32_t biased = (word & 0x000F000Fu) | H::kExponent;
  return as_bits(__hsub2(as_pair<T2>(biased), as_pair<T2>(H::kOffset)));
}

template <typename T>
__device__ __forceinline__ uint32_t scale_pair(uint32_t pair, uint32_t scale_bits) {
  using T2 = typename Half<T>::T2;
  return as_bits(__hmul2(as_pair<T2>(pair), as_pair<T2>(scale_bits)));
}

// One tile row of qweight: read exactly once, so keep it out of L1 (x and the scales live there).
__device__ __forceinline__ uint4 load_weights(const uint4* ptr) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

__device__ __forceinline__ uint32_t load_pair(const void* ptr) { return __ldg(static_cast<const uint32_t*>(ptr)); }

// Where column n's per-channel scale sits in its block of 32 (Marlin's single-group scale permutation).
__device__ __forceinline__ int channel_scale_index(int n) {
  return 32 * (n / 32) + 8 * ((n % 8) / 2) + 2 * ((n % 32) / 8) + n % 2;
}

struct Params {
  const void* x;
  const uint4* qweight;
  const void* scales;
  const void* bias;
  void* y;
  float* partials;
  int* counters;
  int m, n, k, n_out;
  int group_rows;  // k-steps (16 rows of K) per scale group; unused per-channel
  int splits;
  int rows_per_split;
};

template <typename T, int MB, bool GROUPED>
__global__ void __launch_bounds__(kThreads) marlin_gemm_kernel(const Params p) {
  using H = Half<T>;
  constexpr int kUnroll = unroll_for(MB);
  constexpr int kRows = MB * 16;

  const int tile = blockIdx.x;
  const int split = blockIdx.y;
  const int m0 = blockIdx.z * kRows;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;  // fragment row (A, C) / column (B)
  const int t = lane % 4;  // fragment column pair (A, C) / row pair (B)

  const T* x = static_cast<const T*>(p.x);
  const T* scales = static_cast<const T*>(p.scales);
  const int row_begin = split * p.rows_per_split;
  const int row_end = min(row_begin + p.rows_per_split, p.k / kTileK);

  // The two activation rows of each m16 block this lane feeds into its A fragments.
  const T* xrow[MB][2];
  bool has_row[MB][2];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = m0 + mb * 16 + g + 8 * i;
      has_row[mb][i] = r < p.m;
      xrow[mb][i] = x + static_cast<size_t>(has_row[mb][i] ? r : 0) * p.k + 2 * t;
    }
  }

  float acc[MB][8][4];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int b = 0; b < 8; ++b)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mb][b][i] = 0.0f;

  const size_t qweight_row = static_cast<size_t>(p.n) / 2;  // uint4 per row of qweight (2N int32)
  const uint4* wtile = p.qweight + tile * 32 + lane;        // this lane's 16 bytes of each tile row
  const T* stile = scales + tile * kTileN + g * 8;          // this lane's 8 grouped scales of a group row

  for (int base = row_begin + warp * kUnroll; base < row_end; base += kWarps * kUnroll) {
    // Issue every load of this step before the first mma: weights, scales, activations.
    uint4 w[kUnroll];
    uint4 s[kUnroll] = {};
    uint32_t a[kUnroll][MB][4];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int row = base + u;
      if (row < row_end) {
        w[u] = load_weights(wtile + row * qweight_row);
        if (GROUPED)
          s[u] = __ldg(reinterpret_cast<const uint4*>(stile + static_cast<size_t>(row / p.group_rows) * p.n));
        const int col = row * kTileK;
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) {
          a[u][mb][0] = has_row[mb][0] ? load_pair(xrow[mb][0] + col) : 0u;
          a[u][mb][1] = has_row[mb][1] ? load_pair(xrow[mb][1] + col) : 0u;
          a[u][mb][2] = has_row[mb][0] ? load_pair(xrow[mb][0] + col + 8) : 0u;
          a[u][mb][3] = has_row[mb][1] ? load_pair(xrow[mb][1] + col + 8) : 0u;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u >= row_end) continue;  // the same for the whole warp
      const uint32_t words[4] = {w[u].x, w[u].y, w[u].z, w[u].w};
      const uint32_t scale_words[4] = {s[u].x, s[u].y, s[u].z, s[u].w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // 16-column sub-tile
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // its 8-column half: nibbles 2h, 2h+4 (rows 2t, 2t+1), 2h+1, 2h+5 (+8)
          uint32_t b0 = dequant_pair<T>(words[j] >> (8 * h));
          uint32_t b1 = dequant_pair<T>(words[j] >> (8 * h + 4));
          if (GROUPED) {
            const uint32_t one = (scale_words[j] >> (16 * h)) & 0xFFFFu;  // scale of column 16j + 8h + g
            const uint32_t both = one | (one << 16);
            b0 = scale_pair<T>(b0, both);
            b1 = scale_pair<T>(b1, both);
          }
#pragma unroll
          for (int mb = 0; mb < MB; ++mb) H::mma(acc[mb][2 * j + h], a[u][mb], b0, b1);
        }
      }
    }
  }

  // Sum the warps' accumulators: C fragment (row g / g+8, columns 2t, 2t+1) of each 8-column block b.
  __shared__ float red[kRows][kRedStride];
  __shared__ int is_last;
  for (int i = threadIdx.x; i < kRows * kRedStride; i += kThreads) (&red[0][0])[i] = 0.0f;
  __syncthreads();
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      const int r = mb * 16 + g;
      const int c = 8 * b + 2 * t;
      atomicAdd(&red[r][c], acc[mb][b][0]);
      atomicAdd(&red[r][c + 1], acc[mb][b][1]);
      atomicAdd(&red[r + 8][c], acc[mb][b][2]);
      atomicAdd(&red[r + 8][c + 1], acc[mb][b][3]);
    }
  }
  __syncthreads();

  const int rows = min(kRows, p.m - m0);
  if (p.splits > 1) {
    const size_t tile_id = static_cast<size_t>(blockIdx.z) * gridDim.x + tile;
    float* mine = p.partials + (tile_id * p.splits + split) * (kRows * kTileN);
    for (int i = threadIdx.x; i < rows * kTileN; i += kThreads) mine[i] = red[i / kTileN][i % kTileN];
    __threadfence();  // publish the partial before counting this block in
    __syncthreads();
    if (threadIdx.x == 0) {
      is_last = atomicAdd(p.counters + tile_id, 1) == p.splits - 1;
      if (is_last) p.counters[tile_id] = 0;  // every other block has arrived: ready for the next launch
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    const float* all = p.partials + tile_id * p.splits * (kRows * kTileN);
    for (int i = threadIdx.x; i < rows * kTileN; i += kThreads) {
      float v = 0.0f;
      for (int sp = 0; sp < p.splits; ++sp) v += __ldcg(all + static_cast<size_t>(sp) * (kRows * kTileN) + i);
      red[i / kTileN][i % kTileN] = v;  // each thread rereads only its own entries below
    }
  }

  T* y = static_cast<T*>(p.y);
  const T* bias = static_cast<const T*>(p.bias);
  for (int i = threadIdx.x; i < rows * kTileN; i += kThreads) {
    const int r = i / kTileN;
    const int n = tile * kTileN + i % kTileN;
    if (n >= p.n_out) continue;
    float v = red[r][i % kTileN];
    if (!GROUPED) v *= H::to_float(scales[channel_scale_index(n)]);
    if (bias != nullptr) v += H::to_float(bias[n]);
    y[static_cast<size_t>(m0 + r) * p.n_out + n] = H::from_float(v);
  }
}

struct Launch {
  int mb;              // m16 blocks per M chunk (1..4)
  int chunks;          // M chunks (grid z)
  int tiles;           // 64-column tiles (grid x)
  int splits;          // K slices (grid y)
  int rows_per_split;  // k-steps per slice
};

// Blocks an SM holds at once, per m16-block count, from the kernels' register use at 128 threads (ptxas for
// sm_80/sm_90: MB=1 128-167 registers, MB=2/3 152-162, MB=4 192-201; 64K registers per SM). Retune with the
// ptxas report (-Xptxas -v) when the kernel changes.
constexpr int kResidentBlocks[5] = {0, 3, 3, 3, 2};

// Grid for one call. K is split only as far as one full wave of resident blocks allows: a second, partial wave
// would cost nearly as much as the first, and at decode sizes the 64-column tiles alone leave most SMs idle.
Launch plan_launch(int m, int n, int k, int sm_count) {
  Launch l{};
  l.mb = m <= 16 ? 1 : m <= 32 ? 2 : m <= 48 ? 3 : 4;
  l.chunks = m <= 0 ? 0 : (m + 16 * l.mb - 1) / (16 * l.mb);
  l.tiles = n / kTileN;
  const int k_rows = k / kTileK;
  const int blocks = l.tiles * (l.chunks > 0 ? l.chunks : 1);
  const int wave = (sm_count > 0 ? sm_count : 1) * kResidentBlocks[l.mb];
  const int unroll = unroll_for(l.mb);
  int splits = wave / blocks;
  splits = splits < kMaxSplits ? splits : kMaxSplits;
  splits = splits < k_rows / (kWarps * unroll) ? splits : k_rows / (kWarps * unroll);  // a full step per warp
  splits = splits > 1 ? splits : 1;
  int rows = (k_rows + splits - 1) / splits;
  rows = (rows + unroll - 1) / unroll * unroll;  // whole unrolled steps
  l.rows_per_split = rows;
  l.splits = (k_rows + rows - 1) / rows;
  return l;
}

size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

size_t workspace_size(const Launch& l) {
  const size_t tiles = static_cast<size_t>(l.tiles) * l.chunks;
  if (l.splits <= 1) return 0;
  return align_up(tiles * sizeof(int), 256) + tiles * l.splits * (16 * l.mb) * kTileN * sizeof(float);
}

template <typename T, int MB>
void launch_mb(const Params& p, const Launch& l, bool grouped, cudaStream_t stream) {
  const dim3 grid(l.tiles, l.splits, l.chunks);
  if (grouped)
    marlin_gemm_kernel<T, MB, true><<<grid, kThreads, 0, stream>>>(p);
  else
    marlin_gemm_kernel<T, MB, false><<<grid, kThreads, 0, stream>>>(p);
}

template <typename T>
void launch(const Params& p, const Launch& l, bool grouped, cudaStream_t stream) {
  switch (l.mb) {
    case 1:
      launch_mb<T, 1>(p, l, grouped, stream);
      break;
    case 2:
      launch_mb<T, 2>(p, l, grouped, stream);
      break;
    case 3:
      launch_mb<T, 3>(p, l, grouped, stream);
      break;
    default:
      launch_mb<T, 4>(p, l, grouped, stream);
      break;
  }
}

bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

bool shape_ok(int m, int n, int k, int n_out, int scale_groups) {
  if (m < 0 || n <= 0 || k <= 0 || n % kTileN || k % kTileK || n_out <= 0 || n_out > n) return false;
  if (scale_groups <= 0 || k % scale_groups || (k / scale_groups) % kTileK) return false;
  const Launch l = plan_launch(m, n, k, 1);
  return l.chunks <= 65535 && l.tiles <= 2147483647 / 32;
}

}  // namespace marlin
}  // namespace ktinject

extern "C" {

int ktinject_marlin_abi_version(void) { return KTINJECT_MARLIN_ABI_VERSION; }

int ktinject_marlin_workspace_bytes(int m, int n, int k, int sm_count, size_t* bytes) {
  using namespace ktinject::marlin;
  if (bytes == nullptr) return KTINJECT_MARLIN_BAD_POINTER;
  if (m < 0 || n <= 0 || k <= 0 || n % kTileN || k % kTileK) return KTINJECT_MARLIN_BAD_SHAPE;
  *bytes = workspace_size(plan_launch(m, n, k, sm_count));
  return KTINJECT_MARLIN_OK;
}

int ktinject_marlin_gemm(const void* x, const void* qweight, const void* scales, const void* bias, void* y,
                         void* workspace, size_t workspace_bytes, int m, int n, int k, int n_out, int scale_groups,
                         int dtype, int sm_count, void* stream) {
  using namespace ktinject::marlin;
  if (!shape_ok(m, n, k, n_out, scale_groups)) return KTINJECT_MARLIN_BAD_SHAPE;
  if (dtype != KTINJECT_MARLIN_F16 && dtype != KTINJECT_MARLIN_BF16) return KTINJECT_MARLIN_BAD_DTYPE;
  if (m == 0) return KTINJECT_MARLIN_OK;
  if (x == nullptr || qweight == nullptr || scales == nullptr || y == nullptr) return KTINJECT_MARLIN_BAD_POINTER;
  if (!aligned(x, 4) || !aligned(qweight, 16) || !aligned(scales, 16) || !aligned(y, 2) || !aligned(bias, 2))
    return KTINJECT_MARLIN_BAD_POINTER;
  const Launch l = plan_launch(m, n, k, sm_count);
  const size_t need = workspace_size(l);
  if (need > 0 && (workspace == nullptr || workspace_bytes < need || !aligned(workspace, 256)))
    return workspace == nullptr || !aligned(workspace, 256) ? KTINJECT_MARLIN_BAD_POINTER
                                                            : KTINJECT_MARLIN_SMALL_WORKSPACE;

  Params p{};
  p.x = x;
  p.qweight = static_cast<const uint4*>(qweight);
  p.scales = scales;
  p.bias = bias;
  p.y = y;
  const size_t counter_bytes = align_up(static_cast<size_t>(l.tiles) * l.chunks * sizeof(int), 256);
  p.counters = static_cast<int*>(workspace);
  p.partials = need > 0 ? reinterpret_cast<float*>(static_cast<char*>(workspace) + counter_bytes) : nullptr;
  p.m = m;
  p.n = n;
  p.k = k;
  p.n_out = n_out;
  p.group_rows = k / scale_groups / kTileK;
  p.splits = l.splits;
  p.rows_per_split = l.rows_per_split;

  const bool grouped = scale_groups > 1;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == KTINJECT_MARLIN_F16)
    launch<__half>(p, l, grouped, s);
  else
    launch<__nv_bfloat16>(p, l, grouped, s);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? KTINJECT_MARLIN_OK : KTINJECT_MARLIN_CUDA_ERROR + static_cast<int>(err);
}

const char* ktinject_marlin_status_string(int status) {
  switch (status) {
    case KTINJECT_MARLIN_OK:
      return "ok";
    case KTINJECT_MARLIN_BAD_SHAPE:
      return "shape does not fit the Marlin layout (K multiple of 16 and of the group size, N multiple of 64, 0 < "
             "n_out <= N)";
    case KTINJECT_MARLIN_BAD_DTYPE:
      return "dtype must be fp16 (0) or bf16 (1)";
    case KTINJECT_MARLIN_BAD_POINTER:
      return "a pointer is NULL or misaligned (qweight/scales 16 bytes, x 4, y/bias 2, workspace 256)";
    case KTINJECT_MARLIN_SMALL_WORKSPACE:
      return "workspace is smaller than ktinject_marlin_workspace_bytes()";
    default:
      if (status > KTINJECT_MARLIN_CUDA_ERROR)
        return cudaGetErrorString(static_cast<cudaError_t>(status - KTINJECT_MARLIN_CUDA_ERROR));
      return "unknown status";
  }
}

}  // extern "C"
