"""torch's own int4 kernel (tinygemm, ``aten._weight_int4pack_mm``) on Marlin-packed weights, after a one-time conversion.

The fallback when neither of our GPU kernels is available. tinygemm stores its own tiled layout, so the Marlin
codes are unpacked once and handed to ``_convert_weight_to_int4pack`` (CUDA: uint8 ``[N, K/2]``, even k in the
high nibble; CPU: int32 ``[N, K]``). Its dequantization is ``(q - 8) * scale + zero`` per group, so Marlin's
symmetric codes map to ``zero = 0``. Limits: group sizes 32, 64, 128 or 256 only (per-channel scales only when
K itself is one of them), and bf16 activations on CUDA (fp16 inputs are converted).
"""

from __future__ import annotations

import torch
from ktinject.operators.marlin.format import unpack_marlin

SUPPORTED_GROUPS = (32, 64, 128, 256)
INNER_K_TILES = 8  # K is padded to a multiple of 128 = 8 * 16


def int4pack_group_size(K: int, scale_groups: int) -> int | None:
    """The tinygemm group size for a Marlin weight with ``scale_groups`` rows of scales, or None if unsupported."""
    group = K // scale_groups
    return group if group in SUPPORTED_GROUPS and K % (INNER_K_TILES * 16) == 0 else None


def convert_to_int4pack(
    qweight: torch.Tensor, scales: torch.Tensor, K: int, N: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Marlin ``qweight``/``scales`` -> (tinygemm packed weight, scales_and_zeros ``[G, N, 2]``, group size)."""
    group = int4pack_group_size(K, scales.shape[0])
    if group is None:
        raise ValueError(
            f"torch's int4 kernel takes group sizes {SUPPORTED_GROUPS}; this weight has K={K}, {scales.shape[0]} groups"
        )
    codes, natural = unpack_marlin(qweight, scales, -1 if scales.shape[0] == 1 else group, K, N)
    if qweight.device.type == "cuda":
        packed_bytes = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(packed_bytes.contiguous(), INNER_K_TILES)
        sz_dtype = torch.bfloat16
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), INNER_K_TILES)
        sz_dtype = natural.dtype
    scales_and_zeros = torch.stack([natural, torch.zeros_like(natural)], dim=-1).to(sz_dtype).contiguous()
    return packed, scales_and_zeros, group


def int4pack_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """``x [M, K] @ W.T -> [M, N]`` in ``x.dtype`` with torch's kernel (on CUDA the math runs in bf16)."""
    if x.device.type == "cuda":
        y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), packed, group, scales_and_zeros)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(scales_and_zeros.dtype), packed, group, scales_and_zeros)
    return y.to(x.dtype)
