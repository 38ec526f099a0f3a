"""Our CUDA Marlin kernel (csrc/cuda): its dataflow emulated on the CPU, its build, and (on a GPU) its results.

Without a GPU the kernel cannot run, so ``test_kernel_dataflow_emulated`` replays marlin_gemm.cu's index
arithmetic lane by lane in torch: the A fragments it loads from x, the B fragments it decodes from each lane's
16 bytes of qweight (shifts 8h and 8h+4, mask 0x000F000F, the scale word j and half h), the mma.m16n8k16
fragment layouts as the PTX ISA defines them, the shared-memory reduction and the epilogue's per-channel
scale index. A slip in any of these indices fails it. The build test compiles the library for sm_80 and sm_90
with CMake and checks the C interface through the ctypes loader. The ``gpu`` tests run the kernel itself.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from ktinject.operators.marlin import cuda_kernel
from ktinject.operators.marlin.format import marlin_gemm_reference
from marlin_helpers import linear_rules, marlin_ops, random_packed, rel_error, tiny

import ktinject

REPO = Path(__file__).resolve().parents[2]
EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


# ---------------------------------------------------------------------------------------------------------
# The kernel's dataflow, emulated (CPU)
# ---------------------------------------------------------------------------------------------------------

LANE = torch.arange(32)
G, T = LANE // 4, LANE % 4  # groupID, threadID_in_group


def _mma(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mma.m16n8k16 from per-lane fragments, laid out as the PTX ISA specifies (fp32 accumulate).

    a: [32, 4 regs, 2 halves] -> A[16, 16]; b: [32, 2 regs, 2 halves] -> B[16, 8]; returns c [32, 4].
    """
    A = torch.zeros(16, 16)
    B = torch.zeros(16, 8)
    for reg in range(4):
        for half in range(2):
            A[G + 8 * (reg % 2), 2 * T + half + 8 * (reg // 2)] = a[:, reg, half]
    for reg in range(2):
        for half in range(2):
            B[2 * T + half + 8 * reg, G] = b[:, reg, half]
    C = A @ B
    return torch.stack([C[G, 2 * T], C[G, 2 * T + 1], C[G + 8, 2 * T], C[G + 8, 2 * T + 1]], dim=1)


def _round(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return v.to(dtype).float()


def emulate_kernel(x, qweight, scales, bias, n_out):
    """marlin_gemm.cu for one launch, one lane vector at a time (split-K only reorders the fp32 sums: omitted)."""
    dtype = x.dtype
    M, K = x.shape
    N = scales.shape[1]
    grouped = scales.shape[0] > 1
    group_rows = K // scales.shape[0] // 16
    mb_count = 1 if M <= 16 else 2 if M <= 32 else 3 if M <= 48 else 4
    rows_per_chunk = 16 * mb_count
    words = (qweight.to(torch.int64) & 0xFFFFFFFF).reshape(K // 16, N // 64, 32, 4)  # uint4 of lane = words 4l..4l+3
    scale_bits = scales.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    y = torch.empty(M, n_out, dtype=dtype)
    for m0 in range(0, M, rows_per_chunk):
        for tile in range(N // 64):
            acc = torch.zeros(mb_count, 8, 32, 4)
            for row in range(K // 16):
                col = row * 16
                a = torch.zeros(mb_count, 32, 4, 2)
                for mb in range(mb_count):
                    for reg, (i, off) in enumerate([(0, 0), (1, 0), (0, 8), (1, 8)]):
                        r = m0 + mb * 16 + G + 8 * i
                        ok = r < M
                        rr = torch.where(ok, r, torch.zeros_like(r))
                        for half in range(2):
                            a[mb, :, reg, half] = torch.where(
                                ok, x[rr, col + 2 * T + off + half].float(), torch.zeros(32)
                            )
                if grouped:
                    # this lane's 16-byte load: entries tile*64 + 8g .. +7 of the group's scale row
                    srow = scale_bits[row // group_rows]
                    lane_scales = torch.stack([srow[tile * 64 + 8 * G + e] for e in range(8)], dim=1)  # [32, 8]
                for j in range(4):
                    word = words[row, tile, :, j]
                    for h in range(2):
                        b = torch.zeros(32, 2, 2)
                        for reg, shift in enumerate((8 * h, 8 * h + 4)):
                            shifted = word >> shift
                            b[:, reg, 0] = ((shifted & 0xF) - 8).float()  # low half: bits 0-3
                            b[:, reg, 1] = (((shifted >> 16) & 0xF) - 8).float()  # high half: bits 16-19
                        if grouped:
                            s = lane_scales[:, 2 * j + h].to(torch.int16).view(dtype).float()  # word j, half h
                            b = _round(b * s[:, None, None], dtype)
                        for mb in range(mb_count):
                            acc[mb, 2 * j + h] += _mma(_round(a[mb], dtype), b)
            red = torch.zeros(rows_per_chunk, 64)
            for mb in range(mb_count):
                for blk in range(8):
                    r, c = mb * 16 + G, 8 * blk + 2 * T
                    red[r, c] += acc[mb, blk, :, 0]
                    red[r, c + 1] += acc[mb, blk, :, 1]
                    red[r + 8, c] += acc[mb, blk, :, 2]
                    red[r + 8, c + 1] += acc[mb, blk, :, 3]
            for r in range(min(rows_per_chunk, M - m0)):
                for c in range(64):
                    n = tile * 64 + c
                    if n >= n_out:
                        continue
                    v = red[r, c]
                    if not grouped:
                        idx = 32 * (n // 32) + 8 * ((n % 8) // 2) + 2 * ((n % 32) // 8) + n % 2
                        v = v * scales[0, idx].float()
                    if bias is not None:
                        v = v + bias[n].float()
                    y[m0 + r, n] = v.to(dtype)
    return y


@pytest.mark.parametrize(
    "M,group_size,dtype", [(20, 32, torch.bfloat16), (5, -1, torch.float16), (40, 16, torch.float16)]
)
def test_kernel_dataflow_emulated(M, group_size, dtype):
    K, N, n_out = 64, 128, 120
    qweight, scales, _ = random_packed(K, N, group_size, dtype, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(2)).to(dtype)
    bias = torch.randn(n_out, generator=torch.Generator().manual_seed(3)).to(dtype)
    y = emulate_kernel(x, qweight, scales, bias, n_out)
    expected = marlin_gemm_reference(x, qweight, scales, group_size, N, bias)
    eps = EPS[dtype]
    torch.testing.assert_close(y.float(), expected.float(), rtol=eps, atol=eps * float(expected.abs().max()))


# ---------------------------------------------------------------------------------------------------------
# Build (nvcc + CMake) and the C interface through ctypes
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_library(tmp_path_factory) -> Path:
    if not (shutil.which("nvcc") and shutil.which("cmake")):
        pytest.skip("needs nvcc and cmake")
    build = tmp_path_factory.mktemp("marlin_cuda")
    configure = [
        "cmake",
        "-S",
        str(REPO / "csrc" / "cuda"),
        "-B",
        str(build),
        "-DCMAKE_CUDA_ARCHITECTURES=80-real;90-real",
    ]
    for cmd in (configure, ["cmake", "--build", str(build)]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return build / cuda_kernel.LIBRARY_NAME


@pytest.mark.slow
def test_library_builds_for_sm80_and_sm90_and_loads(built_library):
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump:
        listing = subprocess.run([cuobjdump, "--list-elf", str(built_library)], capture_output=True, text=True).stdout
        assert "sm_80" in listing and "sm_90" in listing, listing
    lib = cuda_kernel.MarlinCudaLibrary(built_library)
    # split-K sizing for an H100 (132 SMs x 3 resident blocks): 64 column tiles x 6 K-slices of 48 k-steps
    # (one wave: 384 <= 396 blocks), fp32 partials of 16 rows; counters first, 256-byte aligned
    assert lib.workspace_bytes(1, 4096, 4096, 132) == 256 + 64 * 6 * 16 * 64 * 4
    assert lib.workspace_bytes(4096, 4096, 4096, 132) == 0  # enough blocks without splitting K
    with pytest.raises(ValueError, match="N=100"):
        lib.workspace_bytes(1, 100, 4096, 132)
    raw = lib._lib
    assert (
        raw.ktinject_marlin_gemm(None, None, None, None, None, None, 0, 0, 128, 128, 128, 1, 0, 132, None) == 0
    )  # M = 0
    status = raw.ktinject_marlin_gemm(None, None, None, None, None, None, 0, 1, 128, 128, 128, 1, 0, 132, None)
    assert "NULL or misaligned" in lib.status_string(status)
    status = raw.ktinject_marlin_gemm(None, None, None, None, None, None, 0, 1, 128, 128, 128, 3, 0, 132, None)
    assert "does not fit" in lib.status_string(status)  # 3 scale groups do not divide K=128 into multiples of 16
    status = raw.ktinject_marlin_gemm(None, None, None, None, None, None, 0, 1, 128, 128, 128, 1, 7, 132, None)
    assert "fp16 (0) or bf16 (1)" in lib.status_string(status)
    if not torch.cuda.is_available():  # a launch without a GPU is a CUDA error, not a crash
        status = raw.ktinject_marlin_gemm(256, 256, 256, None, 256, None, 0, 1, 128, 128, 128, 1, 0, 132, None)
        assert status > 1000 and lib.status_string(status)


def test_missing_library_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(cuda_kernel.ENV_VAR, str(tmp_path / "nope.so"))
    cuda_kernel.load_library.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"nope\.so \(\$KTINJECT_MARLIN_LIB\) not found.*run_gpu\.sh"):
            cuda_kernel.load_library()
    finally:
        cuda_kernel.load_library.cache_clear()


# ---------------------------------------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_lib():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    try:
        return cuda_kernel.load_library()
    except RuntimeError as exc:
        pytest.skip(str(exc))


GPU_SHAPES = [(128, 64), (256, 192), (1024, 384), (4096, 4096), (14336, 512)]  # K, N
GPU_BATCHES = [1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 130]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [128, 64, 32, -1])
@pytest.mark.parametrize("K,N", GPU_SHAPES)
def test_cuda_kernel_matches_reference(cuda_lib, K, N, group_size, dtype):
    qweight, scales, _ = random_packed(K, N, group_size, dtype, seed=K + N)
    qweight, scales = qweight.cuda(), scales.cuda()
    gen = torch.Generator().manual_seed(5)
    n_out = N - 7 if N > 64 else N
    bias = (torch.randn(n_out, generator=gen) * 0.1).to(dtype).cuda()
    for m in GPU_BATCHES:
        x = torch.randn(m, K, generator=gen).to(dtype).cuda()
        y = cuda_lib.gemm(x, qweight, scales, bias, n_out)
        expected = marlin_gemm_reference(x, qweight, scales, group_size, N, bias)
        eps = EPS[dtype]
        torch.testing.assert_close(
            y.float(), expected.float(), rtol=eps, atol=eps * float(expected.abs().max()), msg=f"M={m}"
        )


@pytest.mark.gpu
def test_cuda_kernel_is_deterministic_and_reuses_its_workspace(cuda_lib):
    qweight, scales, _ = random_packed(4096, 4096, 128, torch.bfloat16)
    qweight, scales = qweight.cuda(), scales.cuda()
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    first = cuda_lib.gemm(x, qweight, scales, None, 4096)
    for _ in range(5):  # split-K counters must be back at zero after every launch
        assert torch.equal(cuda_lib.gemm(x, qweight, scales, None, 4096), first)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        other = cuda_lib.gemm(x, qweight, scales, None, 4096)
    side.synchronize()
    assert torch.equal(other, first)


@pytest.mark.gpu
@pytest.mark.parametrize("group_size", [128, -1])
def test_gpu_backends_agree_on_one_layer(cuda_lib, group_size):
    from ktinject.operators.marlin.backends import BACKENDS, PackedWeight

    qweight, scales, _ = random_packed(4096, 1024, group_size, torch.bfloat16)
    packed = PackedWeight(qweight.cuda(), scales.cuda(), group_size, 1000)
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    expected = marlin_gemm_reference(x, packed.qweight, packed.scales, group_size, 1024)[:, :1000]
    for name in ["cuda", "triton", "torch_int4", "dequant"]:
        if BACKENDS[name].unavailable(packed):
            continue
        y = BACKENDS[name](packed)(x, None)
        assert rel_error(y, expected) < 1e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_whole_model_same_greedy_tokens_on_every_backend(cuda_lib, family):
    model = tiny(family).to(torch.bfloat16)
    ktinject.optimize(model, linear_rules(device="cuda:0"))
    ops = marlin_ops(model)
    assert {op.backend for op in ops.values()} == {"cuda"}  # auto picks our kernel when it is built
    prompt = torch.tensor([[5, 17, 33, 2, 71]], device="cuda")
    outputs = {}
    for backend in ["cuda", "triton", "torch_int4", "dequant", "emulated"]:
        for op in ops.values():
            op.set_backend(backend)
        outputs[backend] = model.generate(prompt, max_new_tokens=8, do_sample=False)
    # the emulated reference on the CPU, from the same packed tensors
    model.cpu()
    for op in ops.values():
        op.set_backend("auto")
    outputs["cpu"] = model.generate(prompt.cpu(), max_new_tokens=8, do_sample=False).cuda()
    for backend, tokens in outputs.items():
        assert torch.equal(tokens, outputs["cuda"]), backend
