"""The Marlin 4-bit layout (operators/marlin/format.py), bit-exact on CPU.

``_naive_pack`` is a second, independent implementation written element by element from the layout as
published (IST-DASLab/marlin ``_get_perms``: lane fragments, two 8-column blocks, rows 2a, 2a+1, 2a+8, 2a+9,
then the 0,2,4,6,1,3,5,7 interleave; vLLM ``get_scale_perms``), while ``pack_marlin`` uses a closed-form
index. The hard-coded checksums were computed once with ``pack_marlin`` after it matched ``_naive_pack`` and
the hand-derived words in ``test_hand_derived_words``; they pin the layout against silent changes.
"""

from __future__ import annotations

import pytest
import torch
from ktinject.operators.marlin.format import (
    check_gptq_symmetric,
    dequantize_marlin,
    marlin_gemm_reference,
    marlin_padded_shape,
    pack_marlin,
    pad_for_marlin,
    pad_quantized,
    quantize_int4,
    repack_gptq,
    unpack_gptq,
    unpack_marlin,
)

SCALE_PERM_SINGLE_OFFSETS = (0, 1, 8, 9, 16, 17, 24, 25)
INTERLEAVE = (0, 2, 4, 6, 1, 3, 5, 7)


def _to_int32(u: int) -> int:
    return u - (1 << 32) if u >= (1 << 31) else u


def _naive_pack(codes_kn: list[list[int]], scales: list[list[float]], K: int, N: int, grouped: bool):
    """Marlin packing, one word at a time, from the lane/fragment description (no closed form)."""
    qweight = [[0] * (2 * N) for _ in range(K // 16)]
    for kt in range(K // 16):
        for ct in range(N // 64):
            for lane in range(32):
                a = lane % 4
                fragment = [
                    (row, lane // 4 + 8 * block) for block in (0, 1) for row in (2 * a, 2 * a + 1, 2 * a + 8, 2 * a + 9)
                ]
                ordered = [fragment[i] for i in INTERLEAVE]
                for j in range(4):  # 16-column sub-tile
                    word = 0
                    for p, (r, c) in enumerate(ordered):
                        word |= codes_kn[16 * kt + r][64 * ct + 16 * j + c] << (4 * p)
                    qweight[kt][128 * ct + 4 * lane + j] = _to_int32(word)
    out_scales = []
    for row in scales:
        out = [0.0] * N
        block = 64 if grouped else 32
        for b0 in range(0, N, block):
            for p in range(block):
                i, t = divmod(p, 8)
                src = i + 8 * t if grouped else 2 * i + SCALE_PERM_SINGLE_OFFSETS[t]
                out[b0 + p] = row[b0 + src]
        out_scales.append(out)
    return qweight, out_scales


def _checksum(t: torch.Tensor) -> int:
    """Position-weighted sum of the raw bits (int32 words or 16-bit scales), mod 2**61."""
    flat = t.reshape(-1)
    if flat.dtype == torch.int32:
        bits = flat.to(torch.int64) & 0xFFFFFFFF
    else:
        bits = flat.view(torch.int16).to(torch.int64) & 0xFFFF
    return int((bits * torch.arange(1, bits.numel() + 1)).sum()) % (1 << 61)


def _pattern(K: int, N: int, groups: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    n = torch.arange(N).view(-1, 1)
    k = torch.arange(K).view(1, -1)
    codes = ((n * 7 + k * 3 + (n * k) // 32) % 16).to(torch.uint8)  # [N, K], not periodic across tiles
    g = torch.arange(groups).view(-1, 1)
    scales = (1 + (torch.arange(N).view(1, -1) % 5) / 8 + g / 16).to(dtype)  # exact in fp16 and bf16
    return codes, scales


def _random(K: int, N: int, group_size: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else K // group_size
    codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(groups, N, generator=gen) + 0.05).to(dtype)
    return codes, scales


SHAPES = [  # K, N, group_size, scale dtype
    (128, 64, -1, torch.float16),
    (256, 192, 128, torch.bfloat16),
    (512, 128, 64, torch.float16),
    (256, 64, 32, torch.bfloat16),
    (128, 128, 128, torch.float16),  # a single group: per-channel scale layout
    (384, 320, -1, torch.bfloat16),
]


@pytest.mark.parametrize("K,N,group_size,dtype", SHAPES)
def test_pack_unpack_identity(K, N, group_size, dtype):
    codes, scales = _random(K, N, group_size, dtype)
    qweight, mscales = pack_marlin(codes, scales, group_size)
    assert qweight.dtype == torch.int32 and qweight.shape == (K // 16, 2 * N)
    assert mscales.dtype == dtype and mscales.shape == scales.shape
    codes2, scales2 = unpack_marlin(qweight, mscales, group_size, K, N)
    assert codes2.dtype == torch.uint8
    assert torch.equal(codes2, codes)
    assert torch.equal(scales2, scales)
    # the [K, N] orientation packs to the same words
    q_kn, s_kn = pack_marlin(codes.t().contiguous(), scales, group_size, codes_layout="kn")
    assert torch.equal(q_kn, qweight) and torch.equal(s_kn, mscales)


@pytest.mark.parametrize("K,N,group_size", [(64, 128, 32), (32, 64, -1), (48, 192, 16)])
def test_matches_naive_implementation(K, N, group_size):
    codes, scales = _random(K, N, group_size, torch.float32, seed=1)
    qweight, mscales = pack_marlin(codes, scales, group_size)
    grouped = scales.shape[0] > 1
    q_ref, s_ref = _naive_pack(codes.t().tolist(), scales.tolist(), K, N, grouped)
    assert qweight.tolist() == q_ref
    assert mscales.tolist() == s_ref


def test_hand_derived_words():
    # One 16x64 tile with B[k, n] = (k + 3n) % 16. Word 0 is lane 0, sub-tile 0: (r, c) = (0,0) (8,0) (0,8)
    # (8,8) (1,0) (9,0) (1,8) (9,8) -> nibbles 0,8,8,0,1,9,9,1. Word 5 is lane 1, sub-tile 1: rows 2,10,3,11
    # of columns 16 and 24 in the same order -> 2,10,10,2,3,11,11,3.
    k = torch.arange(16).view(-1, 1)
    n = torch.arange(64).view(1, -1)
    codes_kn = (k + 3 * n) % 16
    qweight, _ = pack_marlin(codes_kn, torch.ones(1, 64, dtype=torch.float16), -1, codes_layout="kn")
    assert qweight[0, 0].item() == _to_int32(0x19910880)
    assert qweight[0, 5].item() == _to_int32(0x3BB32AA2)


# Computed once with pack_marlin; the same values came out of _naive_pack and of a third, throw-away
# implementation that builds Marlin's 1024-entry permutation table as published and gathers with it.
QWEIGHT_CHECKSUM = 41056216472868896  # K=256, N=192 (same codes for both scale layouts)
SCALES_CHECKSUM_G128 = 1157754624  # two groups of 128, fp16: 64-column scale blocks
SCALES_CHECKSUM_CHANNEL = 301780480  # per-channel, bf16: 32-column scale blocks


def test_checksum_of_fixed_pattern():
    codes, scales = _pattern(256, 192, 2, torch.float16)
    qweight, mscales = pack_marlin(codes, scales, 128)
    assert (_checksum(qweight), _checksum(mscales)) == (QWEIGHT_CHECKSUM, SCALES_CHECKSUM_G128)
    codes, scales = _pattern(256, 192, 1, torch.bfloat16)
    qweight, mscales = pack_marlin(codes, scales, -1)
    assert (_checksum(qweight), _checksum(mscales)) == (QWEIGHT_CHECKSUM, SCALES_CHECKSUM_CHANNEL)


@pytest.mark.parametrize("group_size,dtype", [(128, torch.float16), (64, torch.bfloat16), (-1, torch.float16)])
def test_quantize_error_bound(group_size, dtype):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(2))
    w[3, :] = 0  # an all-zero row: scale 0, code 8
    codes, scales = quantize_int4(w, group_size, dtype)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert scales.dtype == dtype and scales.shape == (1 if group_size == -1 else 256 // group_size, 96)
    g = 256 if group_size == -1 else group_size
    s = scales.float().t().repeat_interleave(g, dim=1)  # [N, K]
    deq = (codes.float() - 8) * s
    assert torch.all((w - deq).abs() <= s / 2 * (1 + 1e-6) + 1e-12)
    assert torch.all(codes[3] == 8)
    # GPTQ's symmetric convention, scale = 2 * absmax / 15 rounded up to the scale dtype; the extremes use 1 and 15
    g_absmax = w.reshape(96, -1, g).abs().amax(-1).t()
    assert torch.all(scales.float() >= g_absmax / 7.5) and torch.all(scales.float() <= g_absmax / 7.5 * (1 + 2**-7))
    assert int(codes.min()) == 1 and int(codes.max()) == 15


@pytest.mark.parametrize("K,N,group_size,dtype", SHAPES[:4])
def test_dequantize_and_reference_gemm(K, N, group_size, dtype):
    codes, scales = _random(K, N, group_size, dtype, seed=3)
    qweight, mscales = pack_marlin(codes, scales, group_size)
    g = K if group_size == -1 else group_size
    expected_w = (codes.float() - 8) * scales.float().t().repeat_interleave(g, dim=1)
    w = dequantize_marlin(qweight, mscales, group_size, K, N)
    assert torch.equal(w, expected_w)
    x = torch.randn(2, 3, K, generator=torch.Generator().manual_seed(4))
    y = marlin_gemm_reference(x, qweight, mscales, group_size, N)
    assert y.shape == (2, 3, N) and y.dtype == torch.float32
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-4)
    yb = marlin_gemm_reference(x.to(torch.bfloat16), qweight, mscales, group_size, N)
    assert yb.dtype == torch.bfloat16


def _gptq_pack(codes_kn: torch.Tensor) -> torch.Tensor:
    """GPTQ's qweight: int32 [K/8, N], k = 8*row + p at bits 4p (written independently of repack_gptq)."""
    K, N = codes_kn.shape
    acc = torch.zeros(K // 8, N, dtype=torch.int64)
    for p in range(8):
        acc |= codes_kn[p::8].to(torch.int64) << (4 * p)
    return torch.where(acc >= 1 << 31, acc - (1 << 32), acc).to(torch.int32)


@pytest.mark.parametrize("group_size", [128, -1])
def test_repack_gptq_equals_direct_packing(group_size):
    K, N = 256, 128
    codes, scales = _random(K, N, group_size, torch.float16, seed=5)
    q_gptq = _gptq_pack(codes.t())
    direct = pack_marlin(codes, scales, group_size)
    repacked = repack_gptq(q_gptq, scales, group_size)
    assert torch.equal(repacked[0], direct[0]) and torch.equal(repacked[1], direct[1])
    g = K if group_size == -1 else group_size
    trivial = torch.arange(K, dtype=torch.int32) // g
    assert torch.equal(repack_gptq(q_gptq, scales, group_size, g_idx=trivial)[0], direct[0])


def test_unpack_gptq_and_symmetric_zeros():
    codes = torch.randint(0, 16, (64, 24), generator=torch.Generator().manual_seed(8), dtype=torch.uint8)  # [K, N]
    assert torch.equal(unpack_gptq(_gptq_pack(codes)), codes)
    for stored in (7, 8):  # original AutoGPTQ stores zero - 1; later formats store 8
        check_gptq_symmetric(_gptq_pack(torch.full((24, 2), stored, dtype=torch.uint8)).t())
    with pytest.raises(ValueError, match="symmetric"):
        check_gptq_symmetric(_gptq_pack(torch.randint(0, 16, (24, 2), dtype=torch.uint8)).t())


def test_pad_quantized_pads_with_exact_zeros():
    codes, scales = _random(128, 64, 64, torch.float16, seed=9)  # [N=64, K=128], scales [2, 64]
    codes = codes[:50, :]
    scales = scales[:, :50]
    pc, ps = pad_quantized(codes, scales, 64, 256, 64)
    assert pc.shape == (64, 256) and ps.shape == (4, 64)
    assert torch.equal(pc[:50, :128], codes) and torch.equal(ps[:2, :50], scales)
    w = dequantize_marlin(*pack_marlin(pc, ps, 64), 64, 256, 64)
    assert not w[50:].any() and not w[:, 128:].any()
    pc, ps = pad_quantized(codes, scales[:1], -1, 256, 64)  # per-channel: one row stays one row
    assert ps.shape == (1, 64)


def test_reference_rounds_like_the_kernels_and_adds_bias():
    K, N = 256, 128
    codes, scales = _random(K, N, 64, torch.bfloat16, seed=10)
    qweight, mscales = pack_marlin(codes, scales, 64)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    bias = torch.randn(100).to(torch.bfloat16)
    w = ((codes.float() - 8) * scales.float().t().repeat_interleave(64, dim=1)).to(torch.bfloat16).float()
    expected = (x.float() @ w.t())[:, :100] + bias.float()
    y = marlin_gemm_reference(x, qweight, mscales, 64, N, bias)
    assert y.shape == (3, 100) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected.to(torch.bfloat16), rtol=0, atol=0)


def test_repack_gptq_rejects_act_order():
    K, N = 256, 64
    codes, scales = _random(K, N, 128, torch.float16)
    g_idx = (torch.arange(K) // 128).flip(0)
    with pytest.raises(ValueError, match="act-order"):
        repack_gptq(_gptq_pack(codes.t()), scales, 128, g_idx=g_idx)


def test_padding_round_trip():
    assert marlin_padded_shape(300, 100, 128) == (384, 128)
    assert marlin_padded_shape(256, 64, 128) == (256, 64)
    assert marlin_padded_shape(100, 65, -1) == (128, 128)
    assert marlin_padded_shape(200, 64, 256) == (256, 64)
    w = torch.randn(100, 300, generator=torch.Generator().manual_seed(6))
    wp = pad_for_marlin(w, 128)
    assert wp.shape == (128, 384)
    assert torch.equal(wp[:100, :300], w) and not wp[100:].any() and not wp[:, 300:].any()
    aligned = torch.randn(64, 256)
    assert pad_for_marlin(aligned) is aligned
    # padded columns and rows quantize to code 8, i.e. exactly zero, and do not change the real rows
    codes, scales = quantize_int4(wp, 128, torch.float16)
    qweight, mscales = pack_marlin(codes, scales, 128)
    deq = dequantize_marlin(qweight, mscales, 128, 384, 128)
    assert not deq[100:].any() and not deq[:, 300:].any()
    w_aligned_k = torch.randn(100, 256, generator=torch.Generator().manual_seed(7))
    c1, s1 = quantize_int4(w_aligned_k, 128)
    c2, s2 = quantize_int4(pad_for_marlin(w_aligned_k, 128), 128)
    assert torch.equal(c2[:100], c1) and torch.equal(s2[:, :100], s1)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of 64"):
        pack_marlin(torch.zeros(100, 128, dtype=torch.uint8), torch.ones(1, 100), -1)
    with pytest.raises(ValueError, match="group_size"):
        pack_marlin(torch.zeros(64, 128, dtype=torch.uint8), torch.ones(1, 64), 100)
    with pytest.raises(ValueError, match="scales must be"):
        pack_marlin(torch.zeros(64, 128, dtype=torch.uint8), torch.ones(2, 64), -1)
    with pytest.raises(ValueError, match="0..15"):
        pack_marlin(torch.full((64, 128), 16, dtype=torch.int32), torch.ones(1, 64), -1)
    with pytest.raises(ValueError, match="qweight must be"):
        unpack_marlin(torch.zeros(8, 64, dtype=torch.int32), torch.ones(1, 64), -1, 128, 64)
