"""cpu_experts on the layouts it maps onto one routed kernel call in Python: identity experts (LongCat-Flash),
Llama-4's dense call, DBRX's flat storage and 3-D hidden states, Muse Spark's post-expert norm. Each against the
unmodified transformers module, built live and built on meta + loaded, sync and async."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from ktinject.operators.cpu_experts import SUPPORTED_FEATURES, CpuExperts, CpuExpertsConfig
from ktinject.operators.experts_layout import ALL_FEATURES, looks_like_experts
from torch import nn

from ktinject import OperatorError
from ktinject.families.calls import experts_call
from ktinject.families.tiny import tiny_model
from ktinject.native import native_available
from ktinject.weights import ModuleSource

if not native_available():
    pytest.fail("ktinject._native is not built", pytrace=False)

CPU = torch.device("cpu")


@functools.lru_cache(maxsize=None)
def family_model(model_type: str) -> nn.Module:
    return tiny_model(model_type)


def family_experts(model_type: str) -> nn.Module:
    return next(m for m in family_model(model_type).modules() if looks_like_experts(m))


def build(module: nn.Module) -> CpuExperts:
    return CpuExperts.from_module(module, name="layer.experts", device=CPU, config=CpuExpertsConfig())


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    # float32 weights and activations: only summation order differs
    assert ((actual - expected).abs().max() / expected.abs().max()).item() <= 2e-5


LAYOUTS = {  # model type -> the weight names the operator loads
    "longcat_flash": ["gate_up_proj", "down_proj"],
    "llama4": ["gate_up_proj", "down_proj"],
    "dbrx": ["mlp.w1", "mlp.v1", "mlp.w2"],
    "muse_spark": ["gate_up_proj", "down_proj", "post_expert_norm.weight"],
}


def test_cpu_experts_runs_every_layout_experts_layout_describes():
    assert SUPPORTED_FEATURES == ALL_FEATURES


@pytest.mark.parametrize("model_type", LAYOUTS)
def test_live_module_matches_hf(model_type):
    module = family_experts(model_type)
    op = build(module)
    for seed in range(3):
        args = experts_call(op.spec, seed=seed)
        with torch.no_grad():
            assert_matches(op(*args), module(*args))


@pytest.mark.parametrize("model_type", LAYOUTS)
def test_built_on_meta_then_loaded_matches_hf(model_type):
    module = family_experts(model_type)
    op = build(copy.deepcopy(module).to_empty(device="meta"))
    assert op.weight_names() == LAYOUTS[model_type]
    op.load_weights(ModuleSource(module), prefix="")
    args = experts_call(op.spec, seed=1)
    with torch.no_grad():
        assert_matches(op(*args), module(*args))


@pytest.mark.parametrize("model_type", LAYOUTS)
def test_submit_and_sync(model_type):
    module = family_experts(model_type)
    op = build(module)
    args = experts_call(op.spec, seed=2)
    op.submit(*args)
    with torch.no_grad():
        assert_matches(op.sync(), module(*args))


def test_ids_past_the_identity_experts_are_refused():
    op = build(family_experts("longcat_flash"))
    total = op.spec.num_experts + op.spec.identity_experts
    with pytest.raises(OperatorError, match=rf"top_k_index\[0, 1\] = {total} is not an expert id"):
        op(torch.randn(1, op.spec.hidden_size), torch.tensor([[0, total]]), torch.ones(1, 2))


def test_post_expert_norm_runs_before_the_routing_weight_on_a_copy():
    module = copy.deepcopy(family_experts("muse_spark"))
    op = build(module)
    assert (
        type(op.post_expert_norm) is type(module.post_expert_norm)
        and op.post_expert_norm is not module.post_expert_norm
    )
    hidden = torch.randn(4, op.spec.hidden_size)
    index = torch.tensor([[0, 1], [1, 2], [2, 5], [3, 0]])
    weights = torch.rand(4, 2) * 3
    with torch.no_grad():
        expected = module(hidden, index, weights)
        assert_matches(op(hidden, index, weights), expected)
        module.post_expert_norm.weight.normal_()  # the operator holds its own copy
    assert_matches(op(hidden, index, weights), expected)


def test_an_unused_slot_adds_nothing_after_the_norm():
    # Id E marks an unused slot: no expert output, so no norm of a zero row either. (transformers 5.24's Muse
    # Spark module reads uninitialized memory for such a slot, so it is no reference here.)
    op = build(family_experts("muse_spark"))
    hidden, weights = torch.randn(2, op.spec.hidden_size), torch.rand(2, 2) + 0.5
    unused = op(hidden, torch.tensor([[2, op.spec.num_experts], [op.spec.num_experts, 3]]), weights)
    alone = op(hidden, torch.tensor([[2, 0], [1, 3]]), weights * torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(unused, alone, rtol=0, atol=1e-6)


def test_quantized_call_layouts_stay_close():
    # q8_0 weights (dimensions are multiples of 32): the layouts around the kernels do not depend on the type.
    for model_type in ("longcat_flash", "muse_spark", "llama4"):
        module = family_experts(model_type)
        op = CpuExperts.from_module(
            module, name="layer.experts", device=CPU, config=CpuExpertsConfig(weight_type="q8_0")
        )
        args = experts_call(op.spec)
        with torch.no_grad():
            expected, actual = module(*args), op(*args)
        assert ((actual - expected).norm() / expected.norm()).item() < 2e-2, model_type
