"""Quant kernel layer (csrc/quant): GGUF block layouts against gguf-py, the packed layout, gemm against a
float64 reference for every weight type and every ISA this CPU runs, activation functions, quantizer
quality, argument checking."""

from __future__ import annotations

import numpy as np
import pytest

from ktinject.native import native, native_available

if not native_available():
    pytest.skip("ktinject._native is not built", allow_module_level=True)

gguf = pytest.importorskip("gguf")
from gguf import quants as gq  # noqa: E402

m = native()
TYPES = m.supported_weight_types()  # name -> GGML id
ISAS = m.available_isas()
INT8_ACT = {"q8_0", "q4_k", "q5_k", "q6_k"}
# Byte offsets of fp16 scale fields per block, which random blocks must keep finite and moderate.
SCALE_FIELDS = {"q8_0": [0], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208]}


def gguf_dequant(blocks: np.ndarray, name: str, cols: int) -> np.ndarray:
    return gq.dequantize(blocks, gguf.GGMLQuantizationType(TYPES[name])).reshape(blocks.shape[0], cols)


def random_blocks(name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random but valid rows: random code bytes, fp16 scales of sane magnitude (either sign)."""
    if name == "f32":
        return rng.standard_normal((rows, cols), dtype=np.float32).view(np.uint8)
    if name == "f16":
        return rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    if name == "bf16":
        return (
            (rng.standard_normal((rows, cols), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        )
    rb = m.row_bytes(TYPES[name], cols)
    bs = rb * 256 // cols if name != "q8_0" else 34
    raw = rng.integers(0, 256, size=(rows, rb), dtype=np.uint8)
    blocks = raw.reshape(rows, -1, bs)
    for off in SCALE_FIELDS[name]:
        scale = rng.uniform(1e-3, 3e-2, size=blocks.shape[:2]) * rng.choice([-1, 1], size=blocks.shape[:2])
        blocks[:, :, off : off + 2] = scale.astype(np.float16).view(np.uint8).reshape(*blocks.shape[:2], 2)
    return raw


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.mark.parametrize("name", list(TYPES))
def test_dequantize_matches_gguf_bit_exactly(name: str, rng: np.random.Generator) -> None:
    cols = 512
    x = (rng.standard_normal((9, cols)) * rng.uniform(0.01, 3.0, size=(9, 1))).astype(np.float32)
    x[0, :] = 0.0  # an all-zero row: zero scales must not produce nan
    x[1, :256] = -1.5  # constant negative sub-blocks exercise the min path
    for blocks in (m.quantize(TYPES[name], x), random_blocks(name, 9, cols, rng)):
        ours = m.dequantize(TYPES[name], blocks, cols)
        ref = gguf_dequant(blocks, name, cols).astype(np.float32)
        assert ours.dtype == np.float32 and ours.shape == (9, cols)
        np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_f16_conversion_exhaustive() -> None:
    halves = np.arange(65536, dtype=np.uint16)
    finite = ~np.isnan(halves.view(np.float16))
    ours = m.dequantize(TYPES["f16"], halves.view(np.uint8).reshape(1, -1), 65536)[0]
    ref = halves.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(ours[finite].view(np.uint32), ref[finite].view(np.uint32))
    assert np.isnan(ours[~finite]).all()
    # float -> f16 rounding (ties, subnormals, overflow) matches numpy's cast.
    probe = np.concatenate(
        [
            ref[finite],
            (ref[finite][:-1] + ref[finite][1:]) / 2,
            np.float32([65519.0, 65520.0, 1e6, -1e6, 2.0**-25, 2.0**-26, 3 * 2.0**-26]),
        ]
    ).astype(np.float32)
    probe = probe[np.isfinite(probe)]
    probe = probe[: probe.size // 2 * 2]
    ours16 = m.quantize(TYPES["f16"], probe.reshape(1, -1)).view(np.uint16)[0]
    with np.errstate(over="ignore"):
        expected = probe.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(ours16, expected)


@pytest.mark.parametrize("name", ["f16", "bf16", "q8_0"])
def test_quantizer_bytes_match_gguf_reference(name: str, rng: np.random.Generator) -> None:
    x = rng.standard_normal((4, 256)).astype(np.float32)
    ours = m.quantize(TYPES[name], x)
    ref = gq.quantize(x, gguf.GGMLQuantizationType(TYPES[name])).view(np.uint8).reshape(ours.shape)
    np.testing.assert_array_equal(ours, ref)


# Relative RMS error of our quantizers on N(0, 1) data (256 x 2048). Measured: q4_k 0.0703, q5_k 0.0351,
# q6_k 0.0172, q8_0 0.0054. Uniform-noise theory for the ranges these formats span (16/32/64/255 levels
# over about +-2.5 sigma of 32/32/16/32 samples) predicts about 0.09/0.045/0.02/0.006; the bounds sit ~10%
# above the measurement, so a worse fit (e.g. min-max without the scale search: q4_k ~0.085) fails.
RMS_BOUND = {"q4_k": 0.078, "q5_k": 0.039, "q6_k": 0.019, "q8_0": 0.006, "f16": 3e-4, "bf16": 2.5e-3, "f32": 0.0}


@pytest.mark.parametrize("name", list(TYPES))
def test_quantizer_error(name: str) -> None:
    x = np.random.default_rng(7).standard_normal((256, 2048)).astype(np.float32)
    y = m.dequantize(TYPES[name], m.quantize(TYPES[name], x), 2048)
    rel = float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x**2)))
    assert rel <= RMS_BOUND[name], rel


def simulate_act_quant(x: np.ndarray, name: str) -> np.ndarray:
    """What the kernels see of x: int8 codes times one f32 scale per 256 (K-quants) / 32 (Q8_0) values,
    rounded half to even, computed in float32 exactly as quantize_act does."""
    if name not in INT8_ACT:
        return x
    block = 32 if name == "q8_0" else 256
    xb = x.reshape(x.shape[0], -1, block)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.clip(np.rint(xb * inv), -127, 127)
    return (q * (amax / np.float32(127.0))).reshape(x.shape)


# Two references. Exact: the integer dot products are exact, so against the simulated int8 activations
# (float64) the only error is float32 scale arithmetic, ~1e-6; any wrong scale, min, sign or sub-block
# index is orders of magnitude larger. Realistic: against x @ W.T the error is the activation quantization
# alone, about 7e-3 relative for Gaussian data (2e-2 with the outlier channels below).
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", list(TYPES))
def test_gemm_matches_float64_reference(name: str, isa: str, rng: np.random.Generator) -> None:
    rows = 37  # not a multiple of any row tile
    for cols in (256, 768, 2048):
        blocks = (
            random_blocks(name, rows, cols, rng)
            if cols == 768
            else m.quantize(TYPES[name], rng.standard_normal((rows, cols)).astype(np.float32))
        )
        w = gguf_dequant(blocks, name, cols).astype(np.float64)
        for n_tokens in (1, 7, 64):
            x = rng.standard_normal((n_tokens, cols)).astype(np.float32)
            x[:, ::97] *= 4.0  # a few outlier channels, as in real activations
            out = m.gemm(TYPES[name], isa, blocks, x)
            assert out.shape == (n_tokens, rows) and out.dtype == np.float32
            exact = simulate_act_quant(x, name).astype(np.float64) @ w.T
            scale = np.abs(np.abs(x).astype(np.float64) @ np.abs(w).T)  # conditioning of each dot
            assert (np.abs(out - exact) / scale).max() < 1e-5, (cols, n_tokens)
            ref = x.astype(np.float64) @ w.T
            rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
            assert rel < (2.5e-2 if name in INT8_ACT else 1e-5), (cols, n_tokens, rel)


@pytest.mark.parametrize("name", list(TYPES))
def test_isas_agree_and_tile_window(name: str, rng: np.random.Generator) -> None:
    """Every ISA computes the same integer dot products; only float summation order differs. Token counts
    cover full and partial token groups of every ISA (8 on AVX-512, 4 on AVX2); float types also run a
    column count that is not a multiple of the vector loop."""
    rows = 45
    for cols in (1024, 34) if name in ("f32", "f16", "bf16") else (1024,):
        blocks = m.quantize(TYPES[name], rng.standard_normal((rows, cols)).astype(np.float32))
        for n_tokens in (1, 2, 6, 19):
            x = rng.standard_normal((n_tokens, cols)).astype(np.float32)
            ref = m.gemm(TYPES[name], "scalar", blocks, x)
            tol = dict(rtol=2e-5, atol=2e-5 * np.abs(ref).max())
            for isa in ISAS:
                np.testing.assert_allclose(m.gemm(TYPES[name], isa, blocks, x), ref, **tol)
                part = m.gemm(TYPES[name], isa, blocks, x, tile0=1, n_tiles=2)  # rows 16..44 (the last tile is partial)
                assert not part[:, :16].any()
                np.testing.assert_allclose(part[:, 16:], ref[:, 16:], **tol)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", ["q4_k", "q8_0", "bf16"])
def test_gemm_accumulates_scaled_in_token_order(name: str, isa: str, rng: np.random.Generator) -> None:
    """out += scale * value, also when two tokens write the same row (the MoE's duplicate expert ids)."""
    cols, rows = 512, 32
    blocks = m.quantize(TYPES[name], rng.standard_normal((rows, cols)).astype(np.float32))
    x = rng.standard_normal((5, cols)).astype(np.float32)
    plain = m.gemm(TYPES[name], isa, blocks, x)
    base = rng.standard_normal((5, rows)).astype(np.float32)
    scale = [0.5, -2.0, 0.0, 1.0, 3.0]
    out = base.copy()
    m.gemm(TYPES[name], isa, blocks, x, out=out, scale=scale)
    np.testing.assert_allclose(out, base + np.array(scale, np.float32)[:, None] * plain, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", list(TYPES))
def test_pack_unpack_roundtrip(name: str, rng: np.random.Generator) -> None:
    """Packing only moves bytes: same size (rows padded to 16) and unpack gives the GGUF blocks back."""
    for rows, cols in ((1, 256), (16, 512), (45, 1024)):
        blocks = random_blocks(name, rows, cols, rng)
        packed = m.pack(TYPES[name], blocks, cols)
        assert packed.nbytes == -(-rows // 16) * 16 * blocks.shape[1]
        np.testing.assert_array_equal(m.unpack(TYPES[name], packed, rows, cols), blocks)


@pytest.mark.parametrize("name", sorted(INT8_ACT))
def test_activation_bytes_identical_across_isas(name: str, rng: np.random.Generator) -> None:
    x = rng.standard_normal((6, 1024)).astype(np.float32) * 3
    x[1] = 0.0
    x[2, :256] = 1e-30
    x[3, :32] = 1e-39  # denormal: 127 / amax would overflow; such blocks quantize to zeros everywhere
    x[4, 32:64] = 1e-45
    ref = m.quantize_activation(TYPES[name], "scalar", x)
    for isa in ISAS:
        np.testing.assert_array_equal(m.quantize_activation(TYPES[name], isa, x), ref)


ACTIVATION_PARAMS = {
    "gptoss_swiglu": dict(alpha=1.702, limit=7.0),
    "clamped_swiglu": dict(limit=10.0),
    "swiglu_clamp_after": dict(limit=6.0),
    "softcapped_swiglu": dict(softcap_gate=5.0, softcap_up=8.0),
}


def reference_activation(kind: str, gate, up, gated: bool = True):
    """The experts' activation in float64, from operators/experts_layout.py (the torch operators' math)."""
    from ktinject.operators.experts_layout import ExpertsSpec, apply_activation

    params = ACTIVATION_PARAMS.get(kind, {})
    spec = ExpertsSpec(
        num_experts=1,
        hidden_size=1,
        intermediate_size=up.numel(),
        activation=kind,
        has_bias=False,
        gated=gated,
        swiglu_alpha=params.get("alpha", 1.702),
        swiglu_limit=params.get("limit", 7.0),
        softcap_gate=params.get("softcap_gate", 0.0),
        softcap_up=params.get("softcap_up", 0.0),
    )
    return apply_activation(gate, up, spec)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "kind",
    [
        "silu",
        "gelu",
        "gelu_tanh",
        "relu",
        "relu2",
        "quick_gelu",
        "gptoss_swiglu",
        "clamped_swiglu",
        "swiglu_clamp_after",
        "softcapped_swiglu",
    ],
)
def test_activation_functions_match_torch(kind: str, isa: str) -> None:
    import torch

    g = torch.linspace(-30, 30, 4099, dtype=torch.float64)
    u = torch.linspace(-9, 9, 4099, dtype=torch.float64).flip(0)
    reference = reference_activation(kind, g, u)
    ours = m.activate(isa, kind, g.float().numpy(), u.float().numpy(), **ACTIVATION_PARAMS.get(kind, {}))
    # float32 inputs; 1e-6 of the largest value covers exp/erf/tanh approximations (~2e-7 relative)
    np.testing.assert_allclose(ours, reference.numpy(), rtol=2e-6, atol=1e-6 * float(reference.abs().max()))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", ["silu", "gelu", "gelu_tanh", "relu", "relu2", "quick_gelu"])
def test_activations_without_a_gate_match_torch(kind: str, isa: str) -> None:
    import torch

    u = torch.linspace(-20, 20, 4099, dtype=torch.float64)
    reference = reference_activation(kind, None, u, gated=False)
    ours = m.activate(isa, kind, None, u.float().numpy())
    np.testing.assert_allclose(ours, reference.numpy(), rtol=2e-6, atol=1e-6 * float(reference.abs().max()))


def test_activation_arguments_are_checked() -> None:
    x = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="'clamped_swiglu' needs a gate"):
        m.activate("scalar", "clamped_swiglu", None, x)
    with pytest.raises(ValueError, match="'limit': must be finite and > 0"):
        m.activate("scalar", "swiglu_clamp_after", x, x, limit=float("nan"))
    with pytest.raises(ValueError, match="softcap_gate and softcap_up must be finite and > 0"):
        m.activate("scalar", "softcapped_swiglu", x, x)


def test_isa_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert m.best_isa() == ISAS[-1]
    monkeypatch.setenv("KTINJECT_ISA", "scalar")
    assert m.best_isa() == "scalar"
    monkeypatch.setenv("KTINJECT_ISA", "sse9")
    with pytest.raises(ValueError, match="KTINJECT_ISA"):
        m.best_isa()


def test_bad_arguments_raise_value_error() -> None:
    x = np.zeros((2, 256), np.float32)
    b = m.quantize(12, x)
    cases = [
        (lambda: m.quantize(7, x), "type_id"),
        (lambda: m.quantize(12, x.astype(np.float64)), "'x'"),
        (lambda: m.quantize(12, np.zeros(256, np.float32)), "'x'"),
        (lambda: m.quantize(12, np.zeros((2, 100), np.float32)), r"x\.shape\[1\]"),
        (lambda: m.quantize(12, np.zeros((256, 4), np.float32).T), "C-contiguous"),
        (lambda: m.quantize(12, [[0.0] * 256]), "'x'"),
        (lambda: m.dequantize(12, b, 512), "'blocks'"),
        (lambda: m.dequantize(12, b, 250), "'cols'"),
        (lambda: m.dequantize(12, b.astype(np.int8), 256), "'blocks'"),
        (lambda: m.gemm(12, "avx9", b, x), "'isa'"),
        (lambda: m.gemm(12, "scalar", b, np.zeros((2, 512), np.float32)), "'blocks'"),
        (lambda: m.gemm(12, "scalar", b[:, :100].copy(), x), "'blocks'"),
        (lambda: m.gemm(12, "scalar", b, x, tile0=3), "'tile0'"),
        (lambda: m.gemm(12, "scalar", b, x, tile0=0, n_tiles=2), "'n_tiles'"),
        (lambda: m.gemm(12, "scalar", b, x, scale=[1.0]), "'scale'"),
        (lambda: m.pack(12, b, 512), "'blocks'"),
        (lambda: m.unpack(12, b.reshape(-1)[:100].copy(), 2, 256), "'packed'"),
        (lambda: m.activate("scalar", "swish9", x[0], x[0]), "'activation'"),
        (lambda: m.row_bytes(8, 33), "'cols'"),
    ]
    for fn, what in cases:
        with pytest.raises(ValueError, match=what):
            fn()
    if "avx512" not in ISAS:
        with pytest.raises(ValueError, match="'isa'"):
            m.gemm(12, "avx512", b, x)


def test_type_table() -> None:
    assert TYPES == {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_k": 12, "q5_k": 13, "q6_k": 14}
    for name, tid in TYPES.items():
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tid)]
        assert m.row_bytes(tid, 4096) == 4096 // block * size


def test_weight_type_traits_match_the_file_format() -> None:
    """The kernels' one type table (csrc/quant/weight_types.h) says what gguf-py says about every block, and the
    column multiple and activation block its packing and dot products need."""
    traits = m.weight_type_traits()
    assert {name: t["id"] for name, t in traits.items()} == TYPES
    for name, t in traits.items():
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t["id"])]
        assert (t["block_elems"], t["block_bytes"]) == (block, size), name
        assert t["col_granularity"] == (2 if name in ("f16", "bf16") else block), name
        assert t["act_block_elems"] == block, name  # 1 for float types: f32 activations


def test_type_errors_come_from_the_table() -> None:
    """An unknown id lists every kernel type with its id; a bad column count names the type's own multiple."""
    with pytest.raises(ValueError) as err:
        m.row_bytes(7, 256)
    message = str(err.value)
    assert message.startswith("argument 'type_id': unsupported GGML type id 7 (expected one of f32=0, f16=1, ")
    assert all(f"{name}={tid}" in message for name, tid in TYPES.items()), message
    with pytest.raises(ValueError, match=r"argument 'cols': must be a positive multiple of 2 for bf16, got 3"):
        m.row_bytes(TYPES["bf16"], 3)
    with pytest.raises(ValueError, match=r"must be a positive multiple of 32 for q8_0, got 48"):
        m.row_bytes(TYPES["q8_0"], 48)
