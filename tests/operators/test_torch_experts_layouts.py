"""torch_experts on every experts layout in transformers: built from meta + loaded, clamps engaged, call contracts.

(Every family's experts against HF on random routing, and inside whole models: tests/families.)
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from ktinject.operators.experts_layout import looks_like_experts
from ktinject.operators.torch_experts import TorchExperts, TorchExpertsConfig
from torch import nn

from ktinject.families.calls import experts_call
from ktinject.families.tiny import tiny_model
from ktinject.weights import ModuleSource

CPU = torch.device("cpu")


@functools.lru_cache(maxsize=None)
def family_model(model_type: str) -> nn.Module:
    return tiny_model(model_type)


def family_experts(model_type: str, index: int = 0) -> nn.Module:
    return [m for m in family_model(model_type).modules() if looks_like_experts(m)][index]


def build(module: nn.Module, **config) -> TorchExperts:
    return TorchExperts.from_module(module, name="layer.experts", device=CPU, config=TorchExpertsConfig(**config))


def assert_matches(op: TorchExperts, module: nn.Module, *args: torch.Tensor) -> None:
    with torch.no_grad():
        expected, actual = module(*args), op(*args)
    assert actual.shape == expected.shape
    assert ((actual - expected).abs().max() / expected.abs().max()).item() <= 1e-5


LAYOUTS = {  # model type -> (weight names the operator loads, experts index)
    "gpt_oss": (["gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"], 0),
    "openai_privacy_filter": (["gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"], 0),
    "nemotron_h": (["up_proj", "down_proj"], 0),
    "muse_spark": (["gate_up_proj", "down_proj", "post_expert_norm.weight"], 0),
    "longcat_flash": (["gate_up_proj", "down_proj"], 0),
    "dbrx": (["mlp.w1", "mlp.v1", "mlp.w2"], 0),
    "llama4": (["gate_up_proj", "down_proj"], 0),
    "deepseek_v4": (["gate_up_proj", "down_proj"], 0),
    "step3p7": (["gate_up_proj", "down_proj"], 0),
    "inkling2": (["gate_up_proj", "down_proj"], 0),
    "aria": (["gate_up_proj", "down_proj"], 0),
}


@pytest.mark.parametrize("model_type", LAYOUTS)
def test_built_on_meta_then_loaded_matches_hf(model_type):
    names, index = LAYOUTS[model_type]
    module = family_experts(model_type, index)
    meta = copy.deepcopy(module).to_empty(device="meta")
    op = build(meta)
    assert op.weight_names() == names
    op.load_weights(ModuleSource(module), prefix="")
    assert_matches(op, module, *experts_call(op.spec, seed=1))


@pytest.mark.parametrize(
    "model_type", ["gpt_oss", "openai_privacy_filter", "minimax_m3_vl", "deepseek_v4", "step3p7", "inkling2"]
)
def test_clamps_and_softcaps_engaged(model_type):
    # Hidden states 30x larger push gate/up far past the limits (7 or 10) and into the softcaps' tanh.
    module = family_experts(model_type)
    op = build(module)
    hidden, index, weights = experts_call(op.spec)
    assert_matches(op, module, hidden * 30, index, weights)


def test_post_expert_norm_is_the_modules_own():
    module = copy.deepcopy(family_experts("muse_spark"))
    op = build(module)
    assert type(op.post_expert_norm) is type(module.post_expert_norm)
    assert op.post_expert_norm is not module.post_expert_norm  # a copy: the HF module can be dropped
    with torch.no_grad():
        module.post_expert_norm.weight.add_(1.0)  # changing the original later does not change the operator
    assert not torch.equal(op.post_expert_norm.weight, module.post_expert_norm.weight)


@pytest.mark.parametrize("model_type", ["nemotron_h", "muse_spark", "gpt_oss"])
def test_bf16_storage_tracks_fp32(model_type):
    module = family_experts(model_type)
    op = build(module, dtype="bfloat16")
    assert op.up.dtype == torch.bfloat16
    args = experts_call(op.spec)
    with torch.no_grad():
        expected, actual = module(*args), op(*args)
    assert actual.dtype == torch.float32
    assert ((actual - expected).norm() / expected.norm()).item() < 3e-2  # bf16 weights and activations
