"""The marlin_linear operator on the CPU: parity with the Linear it replaces, weights from every source, the
exposed Marlin tensors, kwargs checking, and backend selection with its logged fallbacks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ktinject.operators.marlin import backends
from ktinject.operators.marlin.backends import PackedWeight, first_available
from ktinject.operators.marlin.format import marlin_padded_shape, pack_marlin, pad_for_marlin, quantize_int4
from ktinject.operators.marlin_linear import MarlinLinear, MarlinLinearConfig
from marlin_helpers import DictSource, gptq_pack, linear_rules, tiny, triton_interpreter  # noqa: F401 (a pytest fixture)
from torch import nn

import ktinject
from ktinject import OperatorError, RuleError, WeightError
from ktinject.weights import ModuleSource

CPU = torch.device("cpu")
EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def make_linear(in_features, out_features, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05)
        if bias:
            linear.bias.normal_(0, 0.5)
    return linear.to(dtype)


def build(linear, **kwargs):
    return MarlinLinear.from_module(linear, name="layer.proj", device=CPU, config=MarlinLinearConfig(**kwargs))


def expected_output(linear, x, group_size, dtype):
    """What marlin_linear must return, from quantize_int4 alone (no packing, no backend)."""
    out_f, in_f = linear.weight.shape
    K, N = marlin_padded_shape(in_f, out_f, group_size)
    group = -1 if group_size == -1 or group_size >= K else group_size
    codes, scales = quantize_int4(pad_for_marlin(linear.weight.detach().float(), group_size), group, dtype)
    G = scales.shape[0]
    xq = F.pad(x.reshape(-1, in_f).to(dtype).float(), (0, K - in_f))
    if G == 1:
        y = (xq @ (codes.float() - 8).t()) * scales.float()
    else:
        w = ((codes.float() - 8).reshape(N, G, -1) * scales.float().t().unsqueeze(-1)).reshape(N, K)
        y = xq @ w.to(dtype).float().t()
    y = y[:, :out_f]
    if linear.bias is not None:
        y = y + linear.bias.detach().to(dtype).float()
    return y.to(dtype).reshape(*x.shape[:-1], out_f)


def assert_close_in(dtype, actual, expected):
    eps = EPS[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=eps, atol=eps * float(expected.abs().max()))


CASES = [  # in, out, bias, group_size, dtype
    (256, 128, True, 128, torch.bfloat16),
    (256, 192, False, 64, torch.float16),
    (100, 70, True, 128, torch.bfloat16),  # K and N both padded
    (384, 64, True, -1, torch.float16),  # per-channel
    (512, 96, False, 32, torch.bfloat16),
]


@pytest.mark.parametrize("in_f,out_f,bias,group,dtype", CASES)
def test_matches_quantized_linear(in_f, out_f, bias, group, dtype):
    linear = make_linear(in_f, out_f, bias)
    op = build(linear, group_size=group, dtype=str(dtype).removeprefix("torch."))
    assert op.backend == "emulated"
    for shape in [(1, in_f), (5, in_f), (2, 3, in_f), (in_f,)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        y = op(x)
        assert y.shape == (*shape[:-1], out_f) and y.dtype == torch.float32
        assert_close_in(dtype, y, expected_output(linear, x, group, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_modules_keep_their_dtype(dtype):
    linear = make_linear(256, 128, dtype=dtype)
    op = build(linear)  # dtype auto: the module's
    assert op.scales.dtype == dtype and op.bias.dtype == dtype
    x = torch.randn(4, 256).to(dtype)
    y = op(x)
    assert y.dtype == dtype
    assert_close_in(dtype, y, expected_output(linear, x, 128, dtype))
    assert op(x[:0]).shape == (0, 128)  # an empty batch


def test_fp32_module_computes_in_bf16_by_default():
    op = build(make_linear(128, 64))
    assert op.scales.dtype == torch.bfloat16


def test_exposes_marlin_tensors():
    op = build(make_linear(300, 100), group_size=128)
    K, N = marlin_padded_shape(300, 100, 128)
    assert (K, N) == (384, 128) and op.padded_shape == (K, N)
    sd = op.state_dict()
    assert set(sd) == {"qweight", "scales", "bias"}
    assert sd["qweight"].dtype == torch.int32 and sd["qweight"].shape == (K // 16, 2 * N)
    assert sd["scales"].shape == (K // 128, N) and sd["bias"].shape == (100,)
    assert "group_size=128" in repr(op) and "backend=emulated" in repr(op)


def test_state_dict_round_trip_and_marlin_checkpoint():
    linear = make_linear(256, 128)
    op = build(linear, group_size=64)
    x = torch.randn(3, 256)
    # load_state_dict into an operator built on meta
    with torch.device("meta"):
        meta_linear = nn.Linear(256, 128)
    fresh = MarlinLinear.from_module(meta_linear, name="p", device=CPU, config=MarlinLinearConfig(group_size=64))
    fresh.load_state_dict(op.state_dict())
    assert fresh.backend == "emulated" and torch.equal(fresh(x), op(x))
    # a checkpoint already in Marlin's layout (ours, or another Marlin tool's): checkpoint: marlin
    fresh = MarlinLinear.from_module(
        meta_linear, name="p", device=CPU, config=MarlinLinearConfig(group_size=64, checkpoint="marlin")
    )
    assert fresh.weight_names() == ["qweight", "scales", "bias"]
    fresh.load_weights(DictSource({f"m.{k}": v for k, v in op.state_dict().items()}), "m.")
    assert torch.equal(fresh(x), op(x))
    with pytest.raises(WeightError, match=r"m\.scales: expected \(4, 128\) \(group_size=64\), got \(1, 128\)"):
        bad = dict(op.state_dict(), scales=op.scales[:1])
        fresh.load_weights(DictSource({f"m.{k}": v for k, v in bad.items()}), "m.")


def test_meta_then_load_dense_weights():
    linear = make_linear(200, 96)
    with torch.device("meta"):
        meta_linear = nn.Linear(200, 96)
    op = MarlinLinear.from_module(
        meta_linear, name="model.layers.0.mlp.up_proj", device=CPU, config=MarlinLinearConfig()
    )
    assert op.weight_names() == ["weight", "bias"] and op.backend == ""
    with pytest.raises(OperatorError, match="up_proj: no weights yet"):
        op(torch.randn(1, 200))
    op.load_weights(ModuleSource(linear), "")
    direct = build(linear)
    assert torch.equal(op.qweight, direct.qweight) and torch.equal(op.scales, direct.scales)
    with pytest.raises(WeightError, match=r"w\.weight: expected shape \(96, 200\), got \(96, 100\)"):
        op.load_weights(DictSource({"w.weight": torch.zeros(96, 100), "w.bias": torch.zeros(96)}), "w.")


def test_gguf_weight_is_dequantized_once_and_requantized():
    from gguf import GGMLQuantizationType, quants

    linear = make_linear(256, 64, bias=False)
    blocks = quants.quantize(linear.weight.detach().numpy(), GGMLQuantizationType.Q8_0)
    calls = []

    def dequantize():
        calls.append(1)
        return torch.from_numpy(quants.dequantize(blocks, GGMLQuantizationType.Q8_0).astype(np.float32))

    source = DictSource({"blk.weight": torch.from_numpy(blocks)}, dequantize={"blk.weight": dequantize})
    with torch.device("meta"):
        meta_linear = nn.Linear(256, 64, bias=False)
    op = MarlinLinear.from_module(meta_linear, name="p", device=CPU, config=MarlinLinearConfig())
    op.load_weights(source, "blk.")
    assert len(calls) == 1
    from_dequantized = build(nn.Linear(256, 64, bias=False).requires_grad_(False).eval())
    from_dequantized.load_weights(DictSource({"weight": dequantize()}), "")
    assert torch.equal(op.qweight, from_dequantized.qweight) and torch.equal(op.scales, from_dequantized.scales)


def _gptq_source(in_f, out_f, group, *, zeros=7, g_idx=None, bias=True, prefix="q."):
    linear = make_linear(in_f, out_f, bias)
    codes, scales = quantize_int4(linear.weight.detach(), group, torch.float16)  # GPTQ checkpoints: fp16 scales
    groups = scales.shape[0]
    qzeros = gptq_pack(torch.full((out_f, groups), zeros, dtype=torch.uint8)).t().contiguous()  # [G, N/8]
    tensors = {prefix + "qweight": gptq_pack(codes.t()), prefix + "scales": scales, prefix + "qzeros": qzeros}
    tensors[prefix + "g_idx"] = (
        g_idx if g_idx is not None else torch.arange(in_f, dtype=torch.int32) // (in_f // groups)
    )
    if bias:
        tensors[prefix + "bias"] = linear.bias.detach().half()
    return linear, codes, scales, DictSource(tensors)


@pytest.mark.parametrize("in_f,out_f,group,zeros", [(256, 128, 128, 7), (256, 96, 64, 8), (128, 64, -1, 8)])
def test_gptq_checkpoint_is_repacked(in_f, out_f, group, zeros):
    linear, codes, scales, source = _gptq_source(in_f, out_f, group, zeros=zeros)
    with torch.device("meta"):
        meta_linear = nn.Linear(in_f, out_f)
    op = MarlinLinear.from_module(
        meta_linear,
        name="p",
        device=CPU,
        config=MarlinLinearConfig(group_size=group, checkpoint="gptq", dtype="float16"),
    )
    assert op.weight_names() == ["qweight", "scales", "bias"]
    op.load_weights(source, "q.")
    K, N = op.padded_shape
    padded_codes = torch.full((N, K), 8, dtype=torch.uint8)
    padded_codes[:out_f, :in_f] = codes
    padded_scales = torch.zeros(scales.shape[0], N, dtype=torch.float16)
    padded_scales[:, :out_f] = scales
    expected_q, expected_s = pack_marlin(padded_codes, padded_scales, op.group_size)
    assert torch.equal(op.qweight, expected_q) and torch.equal(op.scales, expected_s)
    x = torch.randn(2, in_f)
    assert_close_in(torch.float16, op(x), expected_output(linear, x, group, torch.float16))


def test_gptq_checkpoint_errors():
    config = MarlinLinearConfig(group_size=128, checkpoint="gptq")
    with torch.device("meta"):
        meta_linear = nn.Linear(256, 128)

    def load(source, config=config):
        MarlinLinear.from_module(meta_linear, name="p", device=CPU, config=config).load_weights(source, "q.")

    with pytest.raises(WeightError, match="symmetric"):
        load(_gptq_source(256, 128, 128, zeros=3)[3])
    with pytest.raises(WeightError, match="act-order"):
        load(_gptq_source(256, 128, 128, g_idx=(torch.arange(256, dtype=torch.int32) // 128).flip(0))[3])
    with pytest.raises(WeightError, match="group size is 64.*set kwargs.group_size to 64"):
        load(_gptq_source(256, 128, 64)[3])
    with pytest.raises(WeightError, match=r"q\.qweight: expected GPTQ int32 \[32, 128\]"):
        load(DictSource({"q.qweight": torch.zeros(16, 128, dtype=torch.int32), "q.scales": torch.ones(2, 128)}))


def test_rule_kwargs_are_checked_when_rules_load():
    with pytest.raises(RuleError, match="bits=4 only"):
        ktinject.load_rules(linear_rules(bits=8))
    with pytest.raises(RuleError, match="multiple of 16"):
        ktinject.load_rules(linear_rules(group_size=100))
    with pytest.raises(RuleError, match="backend"):
        ktinject.load_rules(linear_rules(backend="cutlass"))


def test_requested_backend_that_cannot_run_is_an_error():
    model = tiny("llama")
    with pytest.raises(OperatorError, match=r"backend 'cuda' cannot run on cpu: needs a CUDA device"):
        ktinject.optimize(model, linear_rules(backend="cuda"))
    with pytest.raises(OperatorError, match="replaces nn.Linear"):
        MarlinLinear.from_module(nn.LayerNorm(8), name="norm", device=CPU, config=MarlinLinearConfig())


def test_plan_estimates_packed_bytes():
    model = tiny("llama")
    plan = ktinject.plan(model, linear_rules(group_size=128))
    entry = next(e for e in plan if e.module_name == "model.layers.0.mlp.down_proj")  # in 48, out 32
    assert entry.op == "marlin_linear"
    assert entry.estimated_bytes == 128 * 64 // 2 + 1 * 64 * 2  # K, N padded to 128, 64; one scale row


@pytest.mark.parametrize("group", [128, -1, 16])
def test_cpu_backends_agree(group, triton_interpreter):
    linear = make_linear(256, 96)
    op = build(linear, group_size=group)
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(3))
    expected = expected_output(linear, x, group, torch.bfloat16)
    names = (
        ["emulated", "dequant"] + (["torch_int4"] if group != 16 else []) + (["triton"] if triton_interpreter else [])
    )
    for name in names:
        op.set_backend(name)
        assert op.backend == name
        assert_close_in(torch.bfloat16, op(x), expected)
    if group == 16:
        with pytest.raises(OperatorError, match="torch_int4.*group sizes"):
            op.set_backend("torch_int4")


def test_gpu_fallback_chain_logs_each_step_once(caplog, monkeypatch):
    monkeypatch.setattr(backends, "_logged", set())
    monkeypatch.setattr(
        backends.TritonBackend, "unavailable", classmethod(lambda cls, packed: "triton is not installed (test)")
    )
    op = build(make_linear(256, 64), group_size=16)  # a group size torch's int4 kernel does not take
    packed = PackedWeight(op.qweight, op.scales, op.group_size, op.out_features)
    with caplog.at_level(logging.WARNING, logger="ktinject"):
        for _ in range(3):
            chosen = first_available(backends.GPU_FALLBACK_ORDER, packed)
            assert chosen.name == "dequant"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert "own CUDA kernel unavailable (needs a CUDA device" in messages[0] and messages[0].endswith(
        "falling back to Triton kernel"
    )
    assert "Triton kernel unavailable (triton is not installed (test))" in messages[1]
    assert "torch's int4 kernel unavailable" in messages[2] and messages[2].endswith(
        "falling back to dequantize + F.linear"
    )


def test_moving_or_casting_keeps_a_working_backend():
    linear = make_linear(256, 64)
    op = build(linear)
    op.set_backend("dequant")
    op.to(torch.float16)  # scales and bias follow; the pinned backend is prepared again for the new tensors
    assert op.scales.dtype == torch.float16 and op.backend == "dequant"
    x = torch.randn(2, 256)
    # the same (bf16-representable) scales now in fp16: within bf16's rounding of the bf16-computed output
    assert_close_in(torch.bfloat16, op(x), expected_output(linear, x, 128, torch.bfloat16))
    with pytest.raises(OperatorError, match="float16 or bfloat16"):
        op.float()
