"""Marlin's 4-bit weight layout in pure torch: quantize, pack, unpack, repack GPTQ, pad, and a reference GEMM.

This is the canonical on-device format of ``marlin_linear``; every GPU kernel (Triton, our CUDA kernel in
``csrc/cuda``) reads exactly these tensors, and the functions here are the bit-exact CPU definition they are tested against.
The layout is the one of the IST-DASLab Marlin kernel and of vLLM's ``gptq_marlin`` for 4-bit weights
(``uint4b8``: symmetric, zero point 8), so checkpoints packed by either tool are read unchanged.

Values
    The weight of an ``nn.Linear`` is ``W [N, K]`` (N outputs, K inputs). Marlin works on its transpose
    ``B = W.T [K, N]``. Each element is a 4-bit code ``q`` in 0..15 and its value is ``(q - 8) * s`` where
    ``s`` is the scale of its (group of K, column n). Groups are ``group_size`` consecutive k (any multiple
    of 16 for our kernels, 32/64/128 for Marlin's own); ``group_size=-1`` means one group over the whole K
    (per-channel scales).

qweight: int32 ``[K / 16, 2 * N]``
    B is cut into tiles of 16 rows (k) by 64 columns (n). Tile ``(kt, ct)`` is stored as 128 consecutive
    int32 words in row ``kt`` of ``qweight``, at columns ``128*ct .. 128*ct + 127`` (8 nibbles per word,
    so one row of qweight holds 16 k-rows of all N columns: ``16 * N / 8 = 2N`` words).

    The 128 words of a tile are what the 32 lanes of a warp need for tensor-core ``mma.m16n8k16`` calls:
    word ``4*lane + j`` belongs to lane ``lane`` and to the 16-column sub-tile ``j`` (columns 16j..16j+15 of
    the 64). Per sub-tile a lane owns the B-operand fragment of both 8-column halves: columns
    ``c0 = lane // 4`` and ``c0 + 8``, rows ``r0 = 2*(lane % 4)``, ``r0 + 1``, ``r0 + 8``, ``r0 + 9``.
    Nibble ``p`` (bits ``4p .. 4p+3``) of the word holds, in order p = 0..7::

        (r0, c0) (r0+8, c0) (r0, c0+8) (r0+8, c0+8) (r0+1, c0) (r0+9, c0) (r0+1, c0+8) (r0+9, c0+8)

    so nibbles ``p`` and ``p + 4`` are k-adjacent: the kernel masks a word with 0x000f000f-style masks and gets
    a pair of k-consecutive values in one half2 register (that is the reason for the 0,2,4,6,1,3,5,7 order).
    In closed form, element ``B[k, n]`` lives in::

        row    = k // 16
        word   = 128*(n // 64) + 16*(n % 8) + 4*((k % 8) // 2) + (n % 64) // 16
        nibble = 4*(k % 2) + 2*((n % 16) // 8) + (k % 16) // 8

scales: ``[K / group_size, N]`` (one row per group), fp16 or bf16, columns permuted per row
    - more than one group: blocks of 64 columns are stored as a transposed 8x8, column n at
      ``64*(n // 64) + 8*(n % 8) + (n % 64) // 8``; a thread then reads the scales of all 8-column blocks it
      touches (same ``n % 8``) with one 16-byte load. (Marlin's 64-entry ``scale_perm``.)
    - one group (per-channel, or ``group_size == K``): blocks of 32 columns, column n at
      ``32*(n // 32) + 8*((n % 8) // 2) + 2*((n % 32) // 8) + n % 2``, matching the mma accumulator fragment
      (a lane owns output columns ``2*(lane % 4)`` and ``+1`` of each 8-column block), because per-channel
      scales are applied to the fp32 accumulators after the K loop. (Marlin's 32-entry ``scale_perm_single``.)
    The kernels decide between the two from the number of scale rows, so ``group_size == K`` is per-channel.

Shapes: K must be a multiple of 16 and N of 64 for the layout; the kernels also want K a multiple of 128.
:func:`pad_for_marlin` pads a dense weight once at load time (zeros, which quantize to code 8 = exactly 0),
:func:`pad_quantized` an already quantized one (GPTQ); the kernels skip the padded output columns and the
operator zero-pads the activations' extra K columns.

Sources of the layout facts: IST-DASLab/marlin ``marlin/__init__.py`` (``_get_perms`` and ``Layer.pack``),
vLLM ``vllm/model_executor/layers/quantization/utils/marlin_utils.py`` (``get_scale_perms``,
``marlin_permute_scales``, ``GPTQ_MARLIN_MIN_THREAD_N/K``), ``marlin_utils_test.py`` (``marlin_weights``,
``get_weight_perm``) and ``csrc/quantization/gptq_marlin/gptq_marlin.cu`` (group size from the scale rows).
The code here is our own: it packs through the closed-form index above.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch

__all__ = [
    "ZERO_POINT",
    "quantize_int4",
    "pack_marlin",
    "unpack_marlin",
    "unpack_gptq",
    "check_gptq_symmetric",
    "check_gptq_g_idx",
    "repack_gptq",
    "pad_quantized",
    "marlin_padded_shape",
    "pad_for_marlin",
    "dequantize_marlin",
    "marlin_gemm_reference",
]

ZERO_POINT = 8  # code 8 is the value 0 (uint4 with a bias of 8)
TILE_K = 16  # rows of a tile (one mma k-step)
TILE_N = 64  # columns of a tile (four 16-column mma sub-tiles)
WORDS_PER_TILE = TILE_K * TILE_N // 8  # 128 int32
PAD_K = 128  # smallest k-slice a Marlin thread block handles; a multiple of every supported group size
PAD_N = 64  # smallest n-slice of the gptq_marlin kernels, and the layout's own unit (one tile, one scale block)


def _num_groups(group_size: int, k: int) -> int:
    """Rows of the scale tensor for ``group_size`` over ``k``; raises on a size the layout cannot hold."""
    if group_size == -1:
        return 1
    if group_size <= 0 or group_size % TILE_K:
        raise ValueError(f"group_size must be -1 (per-channel) or a positive multiple of {TILE_K}, got {group_size}")
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of group_size={group_size} (pad the weight first: pad_for_marlin)")
    return k // group_size


def _check_kn(k: int, n: int) -> None:
    if k % TILE_K or n % TILE_N:
        raise ValueError(
            f"Marlin layout needs K a multiple of {TILE_K} and N a multiple of {TILE_N}, got K={k}, N={n} "
            "(pad the weight first: pad_for_marlin)"
        )


# The index tables are cached per device: the dequantize fallback unpacks on the GPU at every call.
@functools.lru_cache(maxsize=None)
def _tile_slots(device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """``[16, 64]`` int64: for element (r, c) of a tile, its slot ``8*word + nibble`` among the tile's 1024."""
    r = torch.arange(TILE_K).view(-1, 1)
    c = torch.arange(TILE_N).view(1, -1)
    word = 16 * (c % 8) + 4 * ((r % 8) // 2) + c // 16
    nibble = 4 * (r % 2) + 2 * ((c % 16) // 8) + r // 8
    return (8 * word + nibble).to(device)


@functools.lru_cache(maxsize=None)
def _tile_sources(device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """``[1024]`` int64: inverse of :func:`_tile_slots`, the element ``r*64 + c`` stored in each slot."""
    return torch.argsort(_tile_slots().flatten()).to(device)


@functools.lru_cache(maxsize=None)
def _scale_positions(grouped: bool, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Position of column ``n`` inside its block of scales (64 when grouped, 32 when per-channel)."""
    if grouped:
        n = torch.arange(64)
        return (8 * (n % 8) + n // 8).to(device)
    n = torch.arange(32)
    return (8 * ((n % 8) // 2) + 2 * (n // 8) + n % 2).to(device)


def _permute_scales(scales: torch.Tensor, grouped: bool) -> torch.Tensor:
    pos = _scale_positions(grouped, scales.device)
    g, n = scales.shape
    # out[pos[i]] = in[i], as a gather with the inverse permutation
    return scales.reshape(g, n // pos.numel(), pos.numel()).index_select(-1, torch.argsort(pos)).reshape(g, n)


def _unpermute_scales(scales: torch.Tensor, grouped: bool) -> torch.Tensor:
    pos = _scale_positions(grouped, scales.device)
    g, n = scales.shape
    return scales.reshape(g, n // pos.numel(), pos.numel()).index_select(-1, pos).reshape(g, n)


def quantize_int4(
    weight: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest 4-bit quantization of ``weight [N, K]``: codes uint8 ``[N, K]``, scales ``[K/g, N]``.

    ``w ~ (code - 8) * scale`` with ``scale = 2 * absmax(group) / 15`` (GPTQ's and Marlin's symmetric convention,
    7% finer than ``absmax / 7``: +-absmax land half-way between the two outermost codes and round inwards, to
    15 and 1; code 0 is only reached by values the rounding pushes past -7.5). The scale is rounded *up* to
    ``scale_dtype`` and the codes are computed against the stored scale, so ``|w - dequant| <= scale / 2`` holds
    for every element. All-zero groups get scale 0 and code 8.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    groups = _num_groups(group_size, k)
    w = weight.detach().float().reshape(n, groups, k // groups)
    if not torch.isfinite(w).all():
        raise ValueError("weight has NaN or infinite values; cannot quantize")
    target = w.abs().amax(dim=-1) / 7.5  # [N, groups], fp32
    scales = target.to(scale_dtype)
    # Round up, never down: a scale below absmax/7.5 would push +absmax past code 15 and break the error bound.
    too_small = scales.float() < target
    if too_small.any():
        scales = torch.where(too_small, torch.nextafter(scales, torch.full_like(scales, math.inf)), scales)
    if not torch.isfinite(scales).all():
        raise ValueError(f"a group scale overflows {scale_dtype}; use scale_dtype=torch.bfloat16")
    s = scales.float()
    s = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(-1)
    codes = (torch.round(w / s).clamp_(-ZERO_POINT, 15 - ZERO_POINT) + ZERO_POINT).to(torch.uint8)
    return codes.reshape(n, k), scales.t().contiguous()


def _pack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """``[..., 8]`` values 0..15 -> ``[...]`` int32, nibble p at bits 4p..4p+3."""
    acc = torch.zeros(nibbles.shape[:-1], dtype=torch.int64, device=nibbles.device)
    for p in range(8):
        acc |= nibbles[..., p].to(torch.int64) << (4 * p)
    return ((acc ^ 0x80000000) - 0x80000000).to(torch.int32)  # reinterpret the unsigned 32 bits as signed


def _unpack_nibbles(words: torch.Tensor) -> torch.Tensor:
    """``[...]`` int32 -> ``[..., 8]`` uint8 (the arithmetic shift's sign bits are masked off)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8)


def pack_marlin(
    codes: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    *,
    codes_layout: Literal["nk", "kn"] = "nk",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack 4-bit ``codes`` and their ``scales [K/g, N]`` into Marlin's ``qweight [K/16, 2N]`` int32 and scales.

    ``codes`` is ``[N, K]`` (``nn.Linear`` orientation, ``codes_layout="nk"``) or ``[K, N]`` (``"kn"``, as GPTQ and
    Marlin store B), values 0..15 in any integer dtype. The scales keep their dtype and are only permuted.
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D, got shape {tuple(codes.shape)}")
    if codes_layout == "nk":
        codes = codes.t()
    elif codes_layout != "kn":
        raise ValueError(f"codes_layout must be 'nk' or 'kn', got {codes_layout!r}")
    k, n = codes.shape
    _check_kn(k, n)
    groups = _num_groups(group_size, k)
    if tuple(scales.shape) != (groups, n):
        raise ValueError(
            f"scales must be [{groups}, {n}] for K={k}, N={n}, group_size={group_size}; got {tuple(scales.shape)}"
        )
    if codes.is_floating_point() or codes.min() < 0 or codes.max() > 15:
        raise ValueError("codes must be integers in 0..15")
    tiles = codes.to(torch.uint8).reshape(k // TILE_K, TILE_K, n // TILE_N, TILE_N).permute(0, 2, 1, 3)
    tiles = tiles.reshape(k // TILE_K, n // TILE_N, TILE_K * TILE_N)
    # index_select, not tiles[..., idx]: advanced indexing takes a path ~100x slower on the CPU for this shape
    slots = tiles.index_select(-1, _tile_sources(codes.device))  # slot order: word-major, nibble-minor
    qweight = _pack_nibbles(slots.reshape(k // TILE_K, n // TILE_N, WORDS_PER_TILE, 8))
    return qweight.reshape(k // TILE_K, 2 * n), _permute_scales(scales, groups > 1).contiguous()


def unpack_marlin(
    qweight: torch.Tensor, scales: torch.Tensor, group_size: int, K: int, N: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inverse of :func:`pack_marlin`: codes uint8 ``[N, K]`` and scales ``[K/g, N]`` in natural column order."""
    _check_kn(K, N)
    groups = _num_groups(group_size, K)
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (K // TILE_K, 2 * N):
        raise ValueError(f"qweight must be int32 [{K // TILE_K}, {2 * N}], got {qweight.dtype} {tuple(qweight.shape)}")
    if tuple(scales.shape) != (groups, N):
        raise ValueError(f"scales must be [{groups}, {N}], got {tuple(scales.shape)}")
    slots = _unpack_nibbles(qweight.reshape(K // TILE_K, N // TILE_N, WORDS_PER_TILE))
    slots = slots.reshape(K // TILE_K, N // TILE_N, TILE_K * TILE_N)
    tiles = slots.index_select(-1, _tile_slots(qweight.device).flatten())  # element order r*64 + c
    tiles = tiles.reshape(K // TILE_K, N // TILE_N, TILE_K, TILE_N).permute(1, 3, 0, 2)  # [n-tile, c, k-tile, r]
    return tiles.reshape(N, K).contiguous(), _unpermute_scales(scales, groups > 1).contiguous()


def unpack_gptq(qweight_gptq: torch.Tensor) -> torch.Tensor:
    """A GPTQ 4-bit ``qweight [K/8, N]`` int32 as codes uint8 ``[K, N]`` (k = 8*row + p sits at bits 4p..4p+3)."""
    if qweight_gptq.dtype != torch.int32 or qweight_gptq.dim() != 2:
        raise ValueError(
            f"GPTQ qweight must be 2-D int32 [K/8, N], got {qweight_gptq.dtype} {tuple(qweight_gptq.shape)}"
        )
    rows, n = qweight_gptq.shape
    return _unpack_nibbles(qweight_gptq).permute(0, 2, 1).reshape(rows * 8, n)


def check_gptq_symmetric(qzeros: torch.Tensor) -> None:
    """Refuse a GPTQ ``qzeros [K/g, N/8]`` that is not the symmetric zero point 8.

    Symmetric 4-bit GPTQ stores 8 in every nibble, or 7 in checkpoints of the original AutoGPTQ format (which
    stores ``zero - 1``); anything else is an asymmetric checkpoint, which the Marlin layout cannot express.
    """
    nibbles = _unpack_nibbles(qzeros.to(torch.int32))
    for stored in (ZERO_POINT, ZERO_POINT - 1):
        if bool((nibbles == stored).all()):
            return
    values = sorted(set(nibbles.flatten().tolist()))[:6]
    raise ValueError(
        f"GPTQ qzeros hold zero points {values}...; marlin_linear needs a symmetric checkpoint (sym: true, zero "
        f"point {ZERO_POINT}, stored as {ZERO_POINT} or {ZERO_POINT - 1})"
    )


def repack_gptq(
    qweight_gptq: torch.Tensor, scales: torch.Tensor, group_size: int, *, g_idx: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a symmetric 4-bit GPTQ weight (``qweight [K/8, N]`` int32, ``scales [K/g, N]``) to Marlin's layout.

    GPTQ packs 8 consecutive k of one column into an int32 (k = 8*row + p at bits 4p); symmetric GPTQ uses
    zero point 8, the same as Marlin, so ``qzeros`` is not needed here (:func:`check_gptq_symmetric` checks it).
    Act-order checkpoints (``desc_act``: ``g_idx`` other than ``arange(K) // group_size``) are refused.
    K and N must already fit the layout; :func:`pad_quantized` pads codes and scales first when they do not.
    """
    codes_kn = unpack_gptq(qweight_gptq)
    check_gptq_g_idx(g_idx, codes_kn.shape[0], group_size)
    return pack_marlin(codes_kn, scales, group_size, codes_layout="kn")


def check_gptq_g_idx(g_idx: torch.Tensor | None, k: int, group_size: int) -> None:
    """Refuse act-order GPTQ weights: ``g_idx`` must be absent or ``arange(K) // group_size``."""
    if g_idx is None or g_idx.numel() == 0:
        return
    groups = _num_groups(group_size, k)
    trivial = torch.arange(k, device=g_idx.device) // (k // groups)
    if tuple(g_idx.shape) != (k,) or not torch.equal(g_idx.to(trivial.dtype), trivial):
        raise ValueError(
            "GPTQ act-order (desc_act) weights are not supported by marlin_linear: g_idx must be "
            f"arange(K) // group_size for K={k}, group_size={group_size}; re-quantize without desc_act"
        )


def pad_quantized(
    codes: torch.Tensor, scales: torch.Tensor, group_size: int, K: int, N: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad codes ``[N0, K0]`` (code 8) and scales ``[G0, N0]`` (scale 0) to ``K`` inputs and ``N`` outputs.

    For weights that arrive already quantized (GPTQ): padded elements dequantize to exactly 0. Grouped scales
    gain rows for the new groups; per-channel scales (one row, or ``group_size == -1``) only gain columns.
    """
    n0, k0 = codes.shape
    if K < k0 or N < n0:
        raise ValueError(f"cannot pad [{n0}, {k0}] down to [{N}, {K}]")
    rows = 1 if scales.shape[0] == 1 else _num_groups(group_size, K)
    out_codes = torch.full((N, K), ZERO_POINT, dtype=torch.uint8, device=codes.device)
    out_codes[:n0, :k0] = codes
    out_scales = torch.zeros(rows, N, dtype=scales.dtype, device=scales.device)
    out_scales[: scales.shape[0], :n0] = scales
    return out_codes, out_scales


def marlin_padded_shape(K: int, N: int, group_size: int = 128) -> tuple[int, int]:
    """``(K, N)`` rounded up to what the kernels take: K to a multiple of 128 (and of ``group_size``), N of 64.

    N pads to 64, not to the 256 of the original IST kernel: 64 is the layout's own unit (a tile and a block of
    grouped scales) and the smallest n-slice of vLLM's gptq_marlin kernels, and it wastes at most 63 rows.
    K pads to 128, the smallest k-slice of every Marlin thread-block configuration.
    """
    k_unit = PAD_K if group_size == -1 else math.lcm(PAD_K, group_size)
    return -(-K // k_unit) * k_unit, -(-N // PAD_N) * PAD_N


def pad_for_marlin(weight: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Zero-pad ``weight [N, K]`` to :func:`marlin_padded_shape` (returned as is when already aligned)."""
    n, k = weight.shape
    kp, np_ = marlin_padded_shape(k, n, group_size)
    if (kp, np_) == (k, n):
        return weight
    return torch.nn.functional.pad(weight, (0, kp - k, 0, np_ - n))


def dequantize_marlin(
    qweight: torch.Tensor, scales: torch.Tensor, group_size: int, K: int, N: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The weight ``[N, K]`` a Marlin-packed tensor stands for, ``(code - 8) * scale`` computed in fp32 (exact)."""
    codes, s = unpack_marlin(qweight, scales, group_size, K, N)
    groups = s.shape[0]
    w = (codes.float() - ZERO_POINT).reshape(N, groups, K // groups) * s.float().t().unsqueeze(-1)
    return w.reshape(N, K).to(dtype)


def marlin_gemm_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    N: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., K] @ W.T (+ bias)`` reading only the packed tensors, as the kernels do; result in ``x.dtype``.

    Mirrors the kernels' arithmetic up to summation order: fp32 accumulation; grouped scales multiply the
    weights inside the K loop and, for 16-bit ``x``, the scaled weight is rounded to ``x.dtype`` (the tensor-core
    operand); per-channel scales multiply the fp32 accumulator after the K loop; the bias is added in fp32 before
    the one rounding to ``x.dtype``. Dequantizes the whole weight per call (a reference, not a fast path).
    ``bias`` may be shorter than ``N`` (unpadded outputs); the result then has ``bias.numel()`` columns.
    """
    K = qweight.shape[0] * TILE_K
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, the packed weight has K={K}")
    codes, s = unpack_marlin(qweight, scales, group_size, K, N)
    x2 = x.reshape(-1, K).float()
    if s.shape[0] == 1:
        y = (x2 @ (codes.float() - ZERO_POINT).t()) * s.float()
    else:
        w = (codes.float() - ZERO_POINT).reshape(N, s.shape[0], -1) * s.float().t().unsqueeze(-1)
        if x.dtype in (torch.float16, torch.bfloat16):
            w = w.to(x.dtype).float()
        y = x2 @ w.reshape(N, K).t()
    if bias is not None:
        y = y[:, : bias.numel()] + bias.float()
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)
