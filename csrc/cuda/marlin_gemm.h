/* C interface of ktinject's Marlin int4 GEMM (csrc/cuda/marlin_gemm.cu).
 *
 * y[M, n_out] = x[M, K] @ W.T + bias, with W [N, K] stored in Marlin's 4-bit layout (operators/marlin/format.py
 * is the bit-exact definition): qweight int32 [K/16, 2N], scales [G, N] (G = 1: per-channel, else group K/G),
 * zero point 8. x, scales, bias and y share one 16-bit type (fp16 or bf16). Plain C so that Python loads it with
 * ctypes and no torch headers are involved: every tensor is a raw device pointer, row-major and contiguous.
 *
 * Shapes: K a multiple of 128 and of 16*(K/G); N a multiple of 64; 0 < n_out <= N (columns >= n_out are padding
 * and are not written; y's row stride is n_out; bias, when not NULL, has n_out entries). M >= 0, any size.
 * Alignment: qweight and scales 16 bytes, x 4 bytes, y and bias 2 bytes.
 *
 * Workspace: a device buffer of ktinject_marlin_workspace_bytes() bytes, zero-filled once by the caller before
 * its first use. The kernel leaves it zeroed again, so it can be reused by later calls on the same stream (two
 * streams running concurrently need two workspaces).
 */
#ifndef KTINJECT_MARLIN_GEMM_H
#define KTINJECT_MARLIN_GEMM_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KTINJECT_MARLIN_ABI_VERSION 1

/* The library is built with hidden visibility; only these entry points are exported. */
#if defined(KTINJECT_MARLIN_BUILD) && defined(__GNUC__)
#define KTINJECT_MARLIN_API __attribute__((visibility("default")))
#else
#define KTINJECT_MARLIN_API
#endif

enum ktinject_marlin_dtype { KTINJECT_MARLIN_F16 = 0, KTINJECT_MARLIN_BF16 = 1 };

enum ktinject_marlin_status {
  KTINJECT_MARLIN_OK = 0,
  KTINJECT_MARLIN_BAD_SHAPE = 1,   /* K, N, n_out, G or M do not fit the layout */
  KTINJECT_MARLIN_BAD_DTYPE = 2,   /* dtype is not one of ktinject_marlin_dtype */
  KTINJECT_MARLIN_BAD_POINTER = 3, /* a required pointer is NULL or misaligned */
  KTINJECT_MARLIN_SMALL_WORKSPACE = 4,
  KTINJECT_MARLIN_CUDA_ERROR = 1000 /* + the cudaError_t value */
};

/* The ABI version this library was built with (KTINJECT_MARLIN_ABI_VERSION); loaders refuse a mismatch. */
KTINJECT_MARLIN_API int ktinject_marlin_abi_version(void);

/* Bytes of workspace the call with these sizes needs (depends on how the work is split over sm_count SMs). */
KTINJECT_MARLIN_API int ktinject_marlin_workspace_bytes(int m, int n, int k, int sm_count, size_t* bytes);

/* Launch y = x @ W.T + bias on `stream` (a cudaStream_t; NULL: the legacy default stream) of the current device.
 * Returns KTINJECT_MARLIN_OK or an error status; launch errors are reported, asynchronous faults surface at the
 * next synchronizing call as usual. */
KTINJECT_MARLIN_API int ktinject_marlin_gemm(const void* x, const void* qweight, const void* scales, const void* bias,
                                             void* y, void* workspace, size_t workspace_bytes, int m, int n, int k,
                                             int n_out, int scale_groups, int dtype, int sm_count, void* stream);

/* A static, human-readable message for a status returned above. */
KTINJECT_MARLIN_API const char* ktinject_marlin_status_string(int status);

#ifdef __cplusplus
}
#endif

#endif /* KTINJECT_MARLIN_GEMM_H */
