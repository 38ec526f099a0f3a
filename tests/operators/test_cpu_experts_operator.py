"""The cpu_experts operator on transformers' experts modules: built from live modules (quantizing to the
rule's weight_type), from GGUF blocks handed over as stored, and inside whole models with stock generate()."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

import ktinject
from ktinject.native import native_available
from ktinject.weights import WeightSource

if not native_available():
    pytest.skip("ktinject._native is not built", allow_module_level=True)

from ktinject.operators.cpu_experts import CpuExperts, CpuExpertsConfig  # noqa: E402
from ktinject.operators.experts_layout import canonical_weights, experts_spec  # noqa: E402
from moe_reference import TYPES, Layer, assert_moe_close, reference  # noqa: E402
from tiny_models import tiny_model, twin  # noqa: E402

H, I, E, K = 256, 512, 8, 2


def experts_module(family: str, dtype=torch.float32):
    """A standalone transformers experts module with K-quant-friendly sizes and random weights."""
    extra = {"num_local_experts": E, "layer_types": ["full_attention"]} if family == "gpt_oss" else {"num_experts": E}
    model = tiny_model(
        family,
        hidden_size=H,
        moe_intermediate_size=I,
        intermediate_size=I,
        num_hidden_layers=1,
        head_dim=64,
        dtype=dtype,
        **extra,
    )
    module = model.model.layers[0].mlp.experts
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.05)
    return module


def layer_from_module(module, wtype: str) -> Layer:
    """What the operator should hold: the module's canonical weights quantized by our quantizer."""
    from ktinject.native import native

    w = canonical_weights(module, experts_spec(module))
    blocks, weights = {}, {}
    import gguf
    from gguf import quants as gq

    for part, t in (("gate", w.gate), ("up", w.up), ("down", w.down)):
        f = t.float().numpy().reshape(-1, t.shape[2])
        b = native().quantize(TYPES[wtype], np.ascontiguousarray(f))
        blocks[part] = b.reshape(t.shape[0], t.shape[1], -1)
        weights[part] = gq.dequantize(b, gguf.GGMLQuantizationType(TYPES[wtype])).reshape(t.shape).astype(np.float64)
    return Layer({"gate": wtype, "up": wtype, "down": wtype}, blocks, weights)


def routing(tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])
    w = torch.rand(tokens, K, generator=g)
    return x, ids, w


def build(module, **kwargs) -> CpuExperts:
    return CpuExperts.from_module(
        module, name="model.layers.0.mlp.experts", device=torch.device("cpu"), config=CpuExpertsConfig(**kwargs)
    )


@pytest.mark.parametrize("wtype", ["q4_k", "q8_0", "q6_k"])
def test_quantized_from_live_module_matches_reference(wtype):
    module = experts_module("qwen3_moe")
    op = build(module, weight_type=wtype, threads=2)
    x, ids, w = routing(7)
    out = op(x, ids, w)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert_moe_close(out.numpy(), reference(layer_from_module(module, wtype), x.numpy(), ids.numpy(), w.numpy()))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_float_weights_match_the_transformers_module(family):
    """f32 weights: the operator computes what the module computes (GPT-OSS: transposed, interleaved,
    biased, clamped swiglu), up to float32 summation order."""
    module = experts_module(family)
    op = build(module, threads=2, numa_nodes=2)
    x, ids, w = routing(9)
    with torch.no_grad():
        expected = module(x, ids, w)
    torch.testing.assert_close(op(x, ids, w), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_bf16_module_keeps_bf16_weights_and_dtype():
    module = experts_module("qwen3_moe", dtype=torch.bfloat16)
    op = build(module)
    assert op._types == ("bf16", "bf16", "bf16")
    x, ids, w = routing(5)
    out = op(x.bfloat16(), ids, w.bfloat16())
    assert out.dtype == torch.bfloat16
    with torch.no_grad():  # HF computes in bf16; we compute in f32 on the same bf16 weights
        expected = module.float()(x.bfloat16().float(), ids, w.bfloat16().float())
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


@dataclasses.dataclass
class FakeRaw:
    stored_name: str
    ggml_type: int
    shape: tuple
    data: np.ndarray


class GgufLikeSource(WeightSource):
    """Offers stacked GGUF expert tensors as stored, like the GGUF weight source does."""

    def __init__(self, layer: Layer) -> None:
        self.layer = layer

    def names(self):
        return [f"model.layers.0.mlp.experts.{n}" for n in ("gate_up_proj", "down_proj")]

    def parts(self, name: str):
        t = self.layer.types
        if name.endswith("gate_up_proj"):
            return [
                FakeRaw(f"blk.0.ffn_{p}_exps.weight", TYPES[t[p]], self.layer.weights[p].shape, self.layer.blocks[p])
                for p in ("gate", "up")
            ]
        return [
            FakeRaw(
                "blk.0.ffn_down_exps.weight",
                TYPES[t["down"]],
                self.layer.weights["down"].shape,
                self.layer.blocks["down"],
            )
        ]

    def tensor(self, name: str, dtype=None, device=None):
        w = self.layer.weights
        if name.endswith("gate_up_proj"):
            return torch.from_numpy(np.concatenate([w["gate"], w["up"]], axis=1)).float()
        return torch.from_numpy(w["down"]).float()


def meta_operator(**kwargs) -> CpuExperts:
    with torch.device("meta"):
        module = experts_module("qwen3_moe")
    return build(module, **kwargs)


def test_gguf_blocks_are_loaded_as_stored():
    layer = layer_from_module(experts_module("qwen3_moe"), "q4_k")
    layer.types["down"] = "q6_k"  # a Q4_K_M-style mix
    from ktinject.native import native

    f = (np.random.default_rng(1).standard_normal((E * H, I)) * 0.05).astype(np.float32)
    layer.blocks["down"] = native().quantize(TYPES["q6_k"], f).reshape(E, H, -1)
    import gguf
    from gguf import quants as gq

    layer.weights["down"] = (
        gq.dequantize(layer.blocks["down"].reshape(E * H, -1), gguf.GGMLQuantizationType.Q6_K)
        .reshape(E, H, I)
        .astype(np.float64)
    )
    op = meta_operator()
    op.load_weights(GgufLikeSource(layer), "model.layers.0.mlp.experts.")
    assert op._types == ("q4_k", "q4_k", "q6_k")
    x, ids, w = routing(6)
    assert_moe_close(op(x, ids, w).numpy(), reference(layer, x.numpy(), ids.numpy(), w.numpy()))


def test_gguf_blocks_of_another_type_are_converted_with_a_warning(caplog):
    layer = layer_from_module(experts_module("qwen3_moe"), "q8_0")
    op = meta_operator(weight_type="q4_k")
    with caplog.at_level(logging.WARNING, logger="ktinject"):
        op.load_weights(GgufLikeSource(layer), "model.layers.0.mlp.experts.")
    assert "converting" in caplog.text and op._types == ("q4_k", "q4_k", "q4_k")


def test_operator_errors_name_the_module():
    module = experts_module("qwen3_moe")
    with pytest.raises(ktinject.OperatorError, match="computes on the CPU"):
        CpuExperts.from_module(module, name="m.experts", device=torch.device("cuda", 0), config=CpuExpertsConfig())
    tiny = tiny_model("qwen3_moe").model.layers[0].mlp.experts  # hidden 32
    with pytest.raises(ktinject.OperatorError, match=r"'m\.experts'.*multiples of 256"):
        CpuExperts.from_module(
            tiny, name="m.experts", device=torch.device("cpu"), config=CpuExpertsConfig(weight_type="q4_k")
        )
    with pytest.raises(ktinject.OperatorError, match="no weights yet"):
        meta_operator()(*routing(1))
    op = build(module)
    with pytest.raises(ktinject.OperatorError, match="sync\\(\\) without submit"):
        op.sync()
    with pytest.raises(ktinject.OperatorError, match=r"top_k_index\[0, 0\] = 99"):
        x, ids, w = routing(1)
        op(x, torch.full_like(ids, 99), w)
    with pytest.raises(ktinject.RuleError, match="threads must be >= 0"):
        ktinject.load_rules(
            "rules:\n  - match: {name: 'x'}\n    replace: {op: cpu_experts, device: cpu, kwargs: {threads: -1}}\n"
        )


def test_submit_sync_overlap_with_other_work():
    module = experts_module("qwen3_moe")
    op = build(module, weight_type="q8_0")
    x, ids, w = routing(16)
    expected = op(x, ids, w)
    op.submit(x, ids, w)
    _ = torch.randn(64, 64) @ torch.randn(64, 64)  # the caller keeps working
    torch.testing.assert_close(op.sync(), expected, rtol=0, atol=0)


CPU_RULES = """
include: [{family}]
vars: {{gpu: cpu}}
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_whole_model_with_cpu_experts_matches_transformers(family, dtype):
    plain = tiny_model(family, dtype=dtype)
    optimized = twin(plain)
    plan = ktinject.optimize(optimized, family, vars={"gpu": "cpu", "cpu_threads": 2})
    # experts on their own, or the experts part of a whole decoder layer (Qwen3-MoE: cpu_decoder_layer)
    experts = [e.module_name for e in plan if e.op == "cpu_experts"]
    experts += [
        e.module_name + ".mlp.experts"
        for e in plan
        if e.op == "decoder_layer" and optimized.get_submodule(e.module_name).form.routed  # not the dense layers
    ]
    assert experts and all(type(optimized.get_submodule(name)).__name__ == "CpuExperts" for name in experts)
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, actual = plain(ids).logits.float(), optimized(ids).logits.float()
    # f32: summation order only. bf16: transformers rounds each expert's matmuls to bf16 and we do not
    # (f32 compute on the same bf16 weights), a difference of a few bf16 ulps of the logits.
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol * expected.abs().max().item())
    kwargs = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(optimized.generate(ids[:1, :5], **kwargs), plain.generate(ids[:1, :5], **kwargs))
