"""A float64 reference of the CPU MoE layer built from gguf-py's dequantizers and numpy matmuls.

The kernels quantize activations to int8 (one scale per 256 values for K-quant weights, per 32 for Q8_0)
before the integer dot products. The reference applies exactly that rounding to x and to h, so the only
remaining differences are float32 summation order (~1e-6 relative) and, rarely, an h value that sits on a
rounding boundary and lands one int8 step apart (~1e-4 of the output). See ``assert_moe_close``.
"""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
from gguf import quants as gq

from ktinject.native import native

TYPES: dict[str, int] = native().supported_weight_types()
INT8_ACT = {"q8_0", "q4_k", "q5_k", "q6_k"}


def act_quant(x: np.ndarray, name: str) -> np.ndarray:
    """What the kernels see of activations x (float32 math, round half to even, clamp to +-127)."""
    x = np.asarray(x, np.float32)
    if name not in INT8_ACT:
        return x.astype(np.float64)
    block = 32 if name == "q8_0" else 256
    xb = x.reshape(*x.shape[:-1], -1, block)
    amax = np.abs(xb).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(xb * inv), -127, 127)
    return (q * (amax / np.float32(127))).reshape(x.shape).astype(np.float64)


def activation(kind: str, g: np.ndarray, u: np.ndarray, alpha: float = 1.702, limit: float = 7.0) -> np.ndarray:
    if kind == "silu":
        return g / (1 + np.exp(-g)) * u
    if kind == "gptoss_swiglu":
        g = np.minimum(g, limit)
        return (np.clip(u, -limit, limit) + 1) * g / (1 + np.exp(-alpha * g))
    raise ValueError(kind)


@dataclasses.dataclass
class Layer:
    """Random experts as GGUF blocks (what the operator loads) and their gguf-py dequantization."""

    types: dict[str, str]  # gate/up/down -> type name
    blocks: dict[str, np.ndarray]  # [E, rows, row_bytes]
    weights: dict[str, np.ndarray]  # float64 [E, rows, cols]

    @property
    def num_experts(self) -> int:
        return self.blocks["gate"].shape[0]


def make_layer(num_experts: int, hidden: int, inter: int, types: dict[str, str], rng: np.random.Generator) -> Layer:
    blocks, weights = {}, {}
    for part, (rows, cols) in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
        f = (rng.standard_normal((num_experts * rows, cols)) * 0.05).astype(np.float32)
        tid = TYPES[types[part]]
        b = native().quantize(tid, f)
        blocks[part] = b.reshape(num_experts, rows, -1)
        weights[part] = (
            gq.dequantize(b, gguf.GGMLQuantizationType(tid)).reshape(num_experts, rows, cols).astype(np.float64)
        )
    return Layer(types, blocks, weights)


def reference(layer: Layer, x: np.ndarray, ids: np.ndarray, w: np.ndarray, kind: str = "silu") -> np.ndarray:
    t = layer.types
    xg, xu = act_quant(x, t["gate"]), act_quant(x, t["up"])
    out = np.zeros((x.shape[0], x.shape[1]))
    for tok in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[tok, k])
            if e == layer.num_experts:  # unused slot
                continue
            h = activation(kind, layer.weights["gate"][e] @ xg[tok], layer.weights["up"][e] @ xu[tok])
            out[tok] += w[tok, k] * (layer.weights["down"][e] @ act_quant(h.astype(np.float32), t["down"]))
    return out


def assert_moe_close(out: np.ndarray, ref: np.ndarray) -> None:
    """Max error 2e-3 of the output scale (one h value a rounding step apart moves an output by ~1e-4 of
    it; a wrong code, scale, sub-block or expert moves it by O(1)), and a median error of 2e-6: nearly
    every value must agree to float32 summation order."""
    scale = np.abs(ref).max()
    err = np.abs(out - ref) / scale
    assert err.max() < 2e-3, f"max relative error {err.max():.2e}"
    assert np.median(err) < 2e-6, f"median relative error {np.median(err):.2e}"
