"""A Triton kernel for ``y = x @ W.T + b`` with W in Marlin's 4-bit layout (see ``operators/marlin/format.py``).

The portable GPU backend of ``marlin_linear`` (our CUDA kernel is the fast one): correctness first, plain
tiling. Each program computes a ``BLOCK_M x 64`` tile of y; per K step it gathers the int32 words of a
``BLOCK_K x 64`` block of B = W.T with the layout's closed-form index, extracts the nibbles, applies grouped
scales in the loop and per-channel scales to the accumulator at the end (as Marlin does), and accumulates
with ``tl.dot`` in fp32. The words of one 16x64 tile are 512 contiguous bytes, so the gather stays within a
few cache lines; the same word is read by 8 elements and served from L1. The dequantized weight is rounded to
the activation dtype before the dot, exactly like the CUDA kernel, so both see the same operand values.

Importing this module needs ``triton``; the backend imports it lazily. With ``TRITON_INTERPRET=1`` set before
the import, the kernel runs on CPU tensors through Triton's interpreter (how the tests check it without a GPU).
The interpreter's ``tl.dot`` mishandles bfloat16 operands (Triton 3.9), so there the dot runs on the same
values widened to fp32; compiled kernels keep the 16-bit tensor-core dot.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _marlin_matmul_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    N_OUT,
    stride_xm,
    stride_ym,
    GROUP_SIZE: tl.constexpr,  # 0: one scale row (per-channel layout)
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)  # k0 is a multiple of 16, so rk % 16 is the row inside the tile

    # B[k, n] sits in word 128*(n//64) + 16*(n%8) + 4*((k%8)//2) + (n%64)//16 of row k//16,
    # at nibble 4*(k%2) + 2*((n%16)//8) + (k%16)//8: split into a column part and a row part.
    col_word = (offs_n // 64) * 128 + (offs_n % 8) * 16 + (offs_n % 64) // 16
    col_shift = ((offs_n % 16) // 8) * 8
    row_word = ((rk % 8) // 2) * 4
    row_shift = (rk % 2) * 16 + ((rk % 16) // 8) * 4
    shift = row_shift[:, None] + col_shift[None, :]
    if GROUP_SIZE > 0:
        scale_col = (offs_n // 64) * 64 + (offs_n % 8) * 8 + (offs_n % 64) // 8
    else:
        scale_col = (offs_n // 32) * 32 + ((offs_n % 8) // 2) * 8 + ((offs_n % 32) // 8) * 2 + offs_n % 2

    m_mask = offs_m[:, None] < M
    # tl.full, not tl.zeros: tl.zeros is a @jit helper, which the interpreter cannot call when triton itself was
    # imported before TRITON_INTERPRET was set (torch imports triton at startup)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :], mask=m_mask, other=0.0)
        words = tl.load(qweight_ptr + (ks // 16)[:, None] * (2 * N) + row_word[:, None] + col_word[None, :])
        w = (((words >> shift) & 0xF) - 8).to(tl.float32)
        if GROUP_SIZE > 0:
            s = tl.load(scales_ptr + (k0 // GROUP_SIZE) * N + scale_col).to(tl.float32)
            w = w * s[None, :]
        w = w.to(x.dtype)  # the operand the tensor cores see, as in the CUDA kernel
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if GROUP_SIZE == 0:
        s = tl.load(scales_ptr + scale_col).to(tl.float32)
        acc = acc * s[None, :]
    n_mask = offs_n < N_OUT
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask & n_mask[None, :])


def marlin_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    n_out: int | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W.T + bias -> [M, n_out]`` in ``x.dtype``; K and N as packed (multiples of 128 and 64).

    ``n_out`` (default N) drops padded output columns inside the kernel; ``bias`` has ``n_out`` entries.
    """
    m, k = x.shape
    n = scales.shape[1]
    n_out = n if n_out is None else n_out
    if qweight.shape != (k // 16, 2 * n) or k % 128 or n % 64 or not 0 < n_out <= n:
        raise ValueError(
            f"marlin_matmul: x [{m}, {k}] does not fit qweight {tuple(qweight.shape)} / scales {tuple(scales.shape)} "
            f"(n_out={n_out})"
        )
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"marlin_matmul: bias must be [{n_out}], got {tuple(bias.shape)}")
    groups = scales.shape[0]
    group_size = k // groups if groups > 1 else 0
    block_k = 64 if group_size == 0 else min(64, group_size)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 64
    x = x.contiguous()
    y = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    grid = (triton.cdiv(m, block_m), n // block_n)
    _marlin_matmul_kernel[grid](
        x,
        qweight,
        scales,
        bias if bias is not None else scales,
        y,
        m,
        n,
        k,
        n_out,
        x.stride(0),
        y.stride(0),
        GROUP_SIZE=group_size,
        HAS_BIAS=bias is not None,
        DOT_F32=INTERPRETED,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return y
