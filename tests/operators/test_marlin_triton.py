"""The Triton Marlin kernel against the reference GEMM: interpreted on the CPU here, compiled on a GPU.

The reference (``marlin_gemm_reference`` with 16-bit x) uses the kernel's operand values, so what is left is
fp32 summation order and the final rounding: one unit in the last place of the output dtype.
"""

from __future__ import annotations

import pytest
import torch
from ktinject.operators.marlin.format import marlin_gemm_reference
from marlin_helpers import random_packed, triton_interpreter  # noqa: F401 (a pytest fixture)

EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}

CASES = [  # M, K, N, group_size, dtype, n_out, bias
    (1, 256, 128, 128, torch.float16, 128, False),
    (5, 256, 192, -1, torch.bfloat16, 150, True),
    (17, 512, 64, 64, torch.bfloat16, 64, True),
    (3, 128, 128, 32, torch.float16, 100, False),
    (33, 384, 128, 128, torch.bfloat16, 128, False),
    (2, 256, 64, 16, torch.float16, 64, True),
]


@pytest.fixture(scope="module")
def kernel(triton_interpreter):
    if torch.cuda.is_available():
        pytest.importorskip("triton")
        from ktinject.operators.marlin import triton_kernel

        return triton_kernel, torch.device("cuda")
    if triton_interpreter is None:
        pytest.skip("triton is not installed")
    return triton_interpreter, torch.device("cpu")


@pytest.mark.parametrize("M,K,N,group_size,dtype,n_out,bias", CASES)
def test_matches_reference(kernel, M, K, N, group_size, dtype, n_out, bias):
    module, device = kernel
    qweight, scales, _ = random_packed(K, N, group_size, dtype, seed=M)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(M, K, generator=gen).to(dtype)
    b = (torch.randn(n_out, generator=gen) * 0.1).to(dtype) if bias else None
    expected = marlin_gemm_reference(
        x, qweight, scales, group_size, N, b if b is not None else torch.zeros(n_out, dtype=dtype)
    )
    y = module.marlin_matmul(
        x.to(device), qweight.to(device), scales.to(device), None if b is None else b.to(device), n_out
    )
    assert y.shape == (M, n_out) and y.dtype == dtype
    eps = EPS[dtype]
    torch.testing.assert_close(y.cpu().float(), expected.float(), rtol=eps, atol=eps * float(expected.abs().max()))


def test_rejects_mismatched_shapes(kernel):
    module, device = kernel
    qweight, scales, _ = random_packed(256, 128, 128, torch.float16)
    with pytest.raises(ValueError, match="does not fit"):
        module.marlin_matmul(
            torch.zeros(1, 128, dtype=torch.float16, device=device), qweight.to(device), scales.to(device)
        )
    with pytest.raises(ValueError, match="bias must be"):
        module.marlin_matmul(
            torch.zeros(1, 256, dtype=torch.float16, device=device),
            qweight.to(device),
            scales.to(device),
            torch.zeros(3, dtype=torch.float16, device=device),
        )
