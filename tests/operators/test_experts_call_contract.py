"""The call contract every experts operator keeps (cpu_experts and its torch reference, torch_experts): identity
experts, Llama-4's dense call, a routed call without routing, DBRX's 3-D hidden states. The layouts' numbers are
tested per operator in test_cpu_experts_call_layouts.py and test_torch_experts_layouts.py."""

from __future__ import annotations

import functools

import pytest
import torch
from ktinject.operators.cpu_experts import CpuExperts, CpuExpertsConfig
from ktinject.operators.experts_layout import looks_like_experts
from ktinject.operators.torch_experts import TorchExperts, TorchExpertsConfig
from torch import nn

from ktinject import OperatorError
from ktinject.families.tiny import tiny_model
from ktinject.native import native_available

if not native_available():
    pytest.fail("ktinject._native is not built", pytrace=False)

CPU = torch.device("cpu")
OPERATORS = {"cpu_experts": (CpuExperts, CpuExpertsConfig), "torch_experts": (TorchExperts, TorchExpertsConfig)}
NAME = r"'?layer\.experts'?"  # how each operator quotes the module in its messages


@functools.lru_cache(maxsize=None)
def family_experts(model_type: str) -> nn.Module:
    return next(m for m in tiny_model(model_type).modules() if looks_like_experts(m))


@pytest.fixture(params=OPERATORS)
def build(request):
    cls, config = OPERATORS[request.param]
    return lambda module: cls.from_module(module, name="layer.experts", device=CPU, config=config())


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    # float32 weights and activations: only summation order differs
    assert ((actual - expected).abs().max() / expected.abs().max()).item() <= 2e-5


def test_identity_experts_return_their_input_times_the_weight(build):
    module = family_experts("longcat_flash")
    op = build(module)
    e = op.spec.num_experts
    hidden = torch.randn(3, op.spec.hidden_size)
    index = torch.tensor([[e, e + 1], [e + 1, 2], [0, e]])  # identity experts are ids e and e+1
    weights = torch.rand(3, 2)
    with torch.no_grad():
        assert_matches(op(hidden, index, weights), module(hidden, index, weights))
    torch.testing.assert_close(
        op(hidden[:1], index[:1], weights[:1]), hidden[:1] * weights[:1].sum(), rtol=1e-6, atol=1e-6
    )


def test_dense_call_contract(build):
    op = build(family_experts("llama4"))
    e, h = op.spec.num_experts, op.spec.hidden_size
    with pytest.raises(OperatorError, match=NAME + r": these experts are called as experts\(hidden\[E\*T, H\]\)"):
        op(torch.randn(e, h), torch.zeros(e, 1, dtype=torch.long), torch.ones(e, 1))
    with pytest.raises(
        OperatorError, match=rf"hidden_states must be \[num_experts\*tokens, {h}\] with num_experts={e}, got \(5, {h}\)"
    ):
        op(torch.randn(5, h))


def test_routed_call_needs_routing(build):
    op = build(family_experts("qwen3_moe"))
    with pytest.raises(OperatorError, match=NAME + r": experts\(hidden, top_k_index, top_k_weights\) needs all three"):
        op(torch.randn(2, op.spec.hidden_size))


def test_dbrx_keeps_its_3d_shape(build):
    module = family_experts("dbrx")
    op = build(module)
    hidden = torch.randn(2, 3, op.spec.hidden_size)
    index = torch.randint(0, op.spec.num_experts, (6, 2))
    weights = torch.rand(6, 2)
    out = op(hidden, index, weights)
    assert out.shape == (2, 3, op.spec.hidden_size)
    with torch.no_grad():
        assert_matches(out, module(hidden, index, weights))
