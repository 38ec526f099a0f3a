"""cpu_linear: the native linear layer against gguf-py's dequantization and a float64 matmul (activation int8
rounding emulated), for every weight type, ISA and a NUMA split; the operator against nn.Linear; `linear`
dispatching by device; GGUF weights taken as stored, with llama.cpp's rope row order undone on the blocks."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import quants as gq

import ktinject
from ktinject.native import native, native_available

if not native_available():
    pytest.fail("ktinject._native is not built", pytrace=False)

from ktinject.operators.cpu_linear import CpuLinear, CpuLinearConfig  # noqa: E402
from moe_reference import TYPES, act_quant  # noqa: E402

ISAS = native().available_isas()
CPU = torch.device("cpu")


def blocks_of(w: np.ndarray, name: str) -> np.ndarray:
    if name == "f32":
        return w.astype(np.float32).view(np.uint8)
    if name == "f16":
        return w.astype(np.float16).view(np.uint8)
    if name == "bf16":
        return torch.from_numpy(w.astype(np.float32)).to(torch.bfloat16).view(torch.uint8).numpy()
    return native().quantize(TYPES[name], np.ascontiguousarray(w, dtype=np.float32))


def dequantized(blocks: np.ndarray, name: str, cols: int) -> np.ndarray:
    return gq.dequantize(blocks, gguf.GGMLQuantizationType(TYPES[name])).reshape(-1, cols).astype(np.float64)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize(
    "rows,cols,tokens,nodes", [(100, 512, 1, 1), (260, 256, 5, 2), (48, 512, 70, 1), (33, 256, 130, 2)]
)
def test_native_linear_matches_the_reference(name, isa, rows, cols, tokens, nodes):
    rng = np.random.default_rng(rows * 1000 + tokens)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    blocks = blocks_of(w, name)
    bias = rng.standard_normal(rows).astype(np.float32)
    lin = native().Linear(rows, cols, type=TYPES[name], has_bias=True, threads=2, numa_nodes=nodes, isa=isa)
    split = 32 if rows > 32 else rows  # loaded in two pieces
    lin.load(0, np.ascontiguousarray(blocks[:split]))
    if split < rows:
        lin.load(split, np.ascontiguousarray(blocks[split:]))
    lin.load_bias(bias)
    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    out = np.full((tokens, rows), np.nan, np.float32)
    lin.forward(x, out)
    ref = act_quant(x, name) @ dequantized(blocks, name, cols).T + bias
    err = np.abs(out - ref) / np.abs(ref).max()
    assert err.max() < 1e-5, (
        f"max relative error {err.max():.2e}"
    )  # the same rounding as the kernels: summation order only
    if nodes > 1:
        (a0, a1), (b0, b1) = lin.slices
        assert a0 == 0 and a1 == b0 and b1 == rows and a1 % 16 == 0


def test_native_linear_checks_its_arguments():
    lin = native().Linear(40, 256, type=TYPES["q8_0"], threads=1)
    rb = native().row_bytes(TYPES["q8_0"], 256)
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError, match="weights are not all loaded"):
        lin.forward(x, np.zeros((2, 40), np.float32))
    with pytest.raises(ValueError, match="whole tiles of 16"):
        lin.load(8, np.zeros((16, rb), np.uint8))
    with pytest.raises(ValueError, match="outside"):
        lin.load(32, np.zeros((16, rb), np.uint8))
    with pytest.raises(ValueError, match=r"'blocks'.*shape"):
        lin.load(0, np.zeros((16, rb + 1), np.uint8))
    lin.load(0, np.zeros((40, rb), np.uint8))
    with pytest.raises(ValueError, match=r"'x'.*shape"):
        lin.forward(np.zeros((2, 128), np.float32), np.zeros((2, 40), np.float32))
    with pytest.raises(ValueError, match=r"'out'.*shape"):
        lin.forward(x, np.zeros((3, 40), np.float32))
    with pytest.raises(ValueError, match=r"'x'.*float32"):
        lin.forward(x.astype(np.float64), np.zeros((2, 40), np.float32))
    with pytest.raises(ValueError, match="not a multiple of 32"):
        native().Linear(40, 100, type=TYPES["q8_0"])
    with pytest.raises(ValueError, match="without a bias"):
        lin.load_bias(np.zeros(40, np.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_operator_keeps_a_float_module_exactly(dtype):
    torch.manual_seed(0)
    module = torch.nn.Linear(96, 70, bias=True).to(dtype)
    op = CpuLinear.from_module(module, name="proj", device=CPU, config=CpuLinearConfig())
    assert op._type == {torch.float32: "f32", torch.bfloat16: "bf16"}[dtype]
    x = torch.randn(3, 5, 96, dtype=dtype)
    y = op(x)
    assert y.shape == (3, 5, 70) and y.dtype == dtype
    expected = torch.nn.functional.linear(x.float(), module.weight.float(), module.bias.float())
    torch.testing.assert_close(
        y.float(),
        expected.to(dtype).float(),
        rtol=1e-5 if dtype == torch.float32 else 1e-2,
        atol=1e-5 if dtype == torch.float32 else 1e-2,
    )


def test_operator_quantizes_a_live_module_to_the_rule_type():
    torch.manual_seed(1)
    module = torch.nn.Linear(512, 64, bias=False)
    op = CpuLinear.from_module(module, name="proj", device=CPU, config=CpuLinearConfig(weight_type="q4_k"))
    assert op._type == "q4_k"
    x = torch.randn(4, 512)
    blocks = native().quantize(TYPES["q4_k"], module.weight.detach().numpy())
    ref = act_quant(x.numpy(), "q4_k") @ dequantized(blocks, "q4_k", 512).T
    assert np.abs(op(x).numpy() - ref).max() / np.abs(ref).max() < 1e-5


def test_operator_errors_name_the_module():
    with pytest.raises(ktinject.OperatorError, match="'blk' .*not a linear layer"):
        CpuLinear.from_module(torch.nn.LayerNorm(8), name="blk", device=CPU, config=CpuLinearConfig())
    with pytest.raises(ktinject.OperatorError, match="in_features 100 is not a multiple of 256, which q4_k needs"):
        CpuLinear.from_module(
            torch.nn.Linear(100, 16), name="p", device=CPU, config=CpuLinearConfig(weight_type="q4_k")
        )
    op = CpuLinear.from_module(torch.nn.Linear(16, 16), name="p", device=CPU, config=CpuLinearConfig())
    with pytest.raises(ktinject.OperatorError, match="input has 8 features, expected 16"):
        op(torch.zeros(2, 8))
    with pytest.raises(ktinject.OperatorError, match="meta device"):
        op(torch.zeros(2, 16, device="meta"))


def test_linear_dispatches_by_device_and_rejects_cpu_only_types_elsewhere():
    from tiny_models import tiny_model

    model = tiny_model("llama")
    rules = "- match: {name: 'q_proj$'}\n  replace: {op: linear, device: 'cuda:0', kwargs: {weight_type: q8_0}}\n"
    with pytest.raises(
        ktinject.OperatorError, match=r"weight_type q8_0 runs on the CPU only; on cuda:0 use auto, bf16"
    ):
        ktinject.plan(model, rules)
    plan = ktinject.plan(model, rules.replace("q8_0", "bf16"))  # planning needs no GPU
    assert [e.op for e in plan] == ["linear", "linear"]
    rules = "- match: {name: 'q_proj$'}\n  replace: {op: cpu_linear, device: 'cuda:0'}\n"
    with pytest.raises(ktinject.OperatorError, match="cpu_linear computes on the CPU, not on cuda:0"):
        ktinject.plan(model, rules)
    ktinject.optimize(model, "- match: {name: 'q_proj$'}\n  replace: {op: linear, device: cpu}\n")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "CpuLinear"


def test_gguf_rope_permuted_rows_are_taken_as_stored_in_hf_order(tmp_path):
    """llama.cpp stores llama's attn_q/attn_k rows in its rope order; cpu_linear gets the Q8_0 blocks with the
    rows put back (no dequantization), so the projection equals the dequantized HF weight's."""
    from gguf_writer import reference_model, write_gguf
    from tiny_models import tiny_model

    model = tiny_model("llama", hidden_size=64, head_dim=16, intermediate_size=64)
    files = write_gguf(model, tmp_path / "m.gguf", types=lambda name, shape: "q8_0" if len(shape) == 2 else "f32")
    loaded = ktinject.from_pretrained(gguf=files[0], vars={"gpu": "cpu"}, dtype=torch.float32, progress=False)
    reference = reference_model(model, files)
    q = loaded.model.layers[1].self_attn.q_proj
    assert type(q).__name__ == "CpuLinear" and q._type == "q8_0"
    x = torch.randn(3, 64)
    ref_w = reference.model.layers[1].self_attn.q_proj.weight.detach().double().numpy()
    expected = act_quant(x.numpy(), "q8_0") @ ref_w.T
    assert np.abs(q(x).numpy() - expected).max() / np.abs(expected).max() < 1e-5
