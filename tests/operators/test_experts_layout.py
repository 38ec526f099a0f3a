"""experts_layout: reading a HF experts module's layout and math off the module, and the reference math."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from ktinject.operators.experts_layout import (
    ALL_FEATURES,
    KERNEL_FEATURES,
    ExpertsSpec,
    apply_activation,
    canonical_weights,
    experts_spec,
    looks_like_experts,
    split_gate_up,
    weight_names,
)
from torch import nn
from transformers import MixtralConfig
from transformers.activations import ACT2FN
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from ktinject import OperatorError
from ktinject.families.tiny import tiny_model


def mixtral_experts(hidden_act: str = "silu", *, device: str = "cpu") -> MixtralExperts:
    config = MixtralConfig(hidden_size=16, intermediate_size=8, num_local_experts=4, hidden_act=hidden_act)
    with torch.device(device):
        module = MixtralExperts(config)
    if device != "meta":
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0.0, 0.3)
    return module


@functools.lru_cache(maxsize=None)
def family_model(model_type: str) -> nn.Module:
    return tiny_model(model_type)


def family_experts(model_type: str, index: int = 0) -> nn.Module:
    return [m for m in family_model(model_type).modules() if looks_like_experts(m)][index]


@pytest.mark.parametrize(
    ("hidden_act", "activation"),
    [
        ("silu", "silu"),
        ("swish", "silu"),
        ("gelu", "gelu"),
        ("gelu_pytorch_tanh", "gelu_tanh"),
        ("gelu_new", "gelu_tanh"),
        ("gelu_fast", "gelu_tanh"),
        ("relu", "relu"),
        ("relu2", "relu2"),
        ("quick_gelu", "quick_gelu"),
    ],
)
def test_activation_is_recognised_by_what_it_computes(hidden_act, activation):
    spec = experts_spec(mixtral_experts(hidden_act), supports=ALL_FEATURES)
    assert spec.activation == activation
    assert (spec.num_experts, spec.hidden_size, spec.intermediate_size) == (4, 16, 8)


def test_meta_module_is_described_without_its_weights():
    spec = experts_spec(mixtral_experts("gelu", device="meta"), name="m.experts")
    assert spec.activation == "gelu" and not spec.features - KERNEL_FEATURES


def test_unknown_activation_names_module_and_candidates():
    with pytest.raises(
        OperatorError,
        match=r"'model\.layers\.0\.mlp\.experts' \(MixtralExperts\): .*act_fn MishActivation\) "
        r"computes none of the known activations \(.*silu, gelu, gelu_tanh, relu, relu2",
    ):
        experts_spec(mixtral_experts("mish"), name="model.layers.0.mlp.experts")


def test_activation_that_cannot_run_on_a_probe_is_an_operator_error():
    module = mixtral_experts("prelu").to("meta")  # PReLU's weight is on meta: the probe cannot run it
    with pytest.raises(OperatorError, match="'e' .*cannot run its gate function on a probe"):
        experts_spec(module, name="e")


class _OddGate(MixtralExperts):
    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.tanh(gate) * up


def test_unrecognised_gate_function_is_an_operator_error():
    config = MixtralConfig(hidden_size=16, intermediate_size=8, num_local_experts=4)
    with pytest.raises(
        OperatorError,
        match=r"'x' \(_OddGate\): its gate function \(_apply_gate on concatenated gate/up, "
        r"act_fn SiLUActivation\) computes none of the known activations",
    ):
        experts_spec(_OddGate(config), name="x")


def test_unknown_activation_of_non_gated_experts():
    module = copy.deepcopy(family_experts("nemotron_h"))
    module.act_fn = ACT2FN["mish"]
    with pytest.raises(
        OperatorError, match=r"'y' \(NemotronHExperts\): activation MishActivation is none of silu, gelu"
    ):
        experts_spec(module, name="y", supports=ALL_FEATURES)


@pytest.mark.parametrize(
    ("model_type", "index", "activation", "params"),
    [
        (
            "gpt_oss",
            0,
            "gptoss_swiglu",
            dict(swiglu_limit=7.0, swiglu_alpha=1.702, interleaved=True, transposed=True, has_bias=True),
        ),
        (
            "openai_privacy_filter",
            0,
            "gptoss_swiglu",
            dict(swiglu_limit=7.0, interleaved=False, transposed=True, has_bias=True),
        ),
        ("minimax_m3_vl", 0, "gptoss_swiglu", dict(swiglu_limit=7.0, interleaved=False, transposed=False)),
        ("deepseek_v4", 0, "clamped_swiglu", dict(swiglu_limit=10.0)),
        ("hy_v4", 0, "clamped_swiglu", dict(swiglu_limit=10.0)),
        ("step3p7", 0, "swiglu_clamp_after", dict(swiglu_limit=7.0)),
        ("step3p7", 1, "silu", {}),  # a 0 limit in swiglu_limits: no clamp at all
        ("inkling2", 0, "softcapped_swiglu", dict(softcap_gate=4.0, softcap_up=25.0)),
        ("nemotron_h", 0, "relu2", dict(gated=False)),
        ("gemma4", 0, "gelu_tanh", {}),
        ("aria", 0, "silu", dict(transposed=True)),
        ("llama4", 0, "silu", dict(transposed=True, call="dense")),
        ("longcat_flash", 0, "silu", dict(identity_experts=2, num_experts=8)),
        ("muse_spark", 0, "silu", dict(post_expert_norm=True)),
        ("dbrx", 0, "silu", dict(storage="w1_v1_w2", hidden_3d=True, num_experts=8, intermediate_size=32)),
    ],
)
def test_every_layout_in_transformers_is_read(model_type, index, activation, params):
    spec = experts_spec(family_experts(model_type, index), supports=ALL_FEATURES)
    assert spec.activation == activation
    for field, value in params.items():
        assert getattr(spec, field) == value, field


@pytest.mark.parametrize(
    ("model_type", "feature"),
    [
        ("nemotron_h", "activation relu2"),
        ("muse_spark", "post-expert norm"),
        ("longcat_flash", "identity experts"),
        ("llama4", "dense call"),
        ("dbrx", "3-D hidden states"),
        ("deepseek_v4", "activation clamped_swiglu"),
    ],
)
def test_layout_outside_supports_names_module_and_feature(model_type, feature):
    with pytest.raises(
        OperatorError, match=rf"'layer\.experts' \(\w+\): {feature} is not supported by this operator \(layout: "
    ):
        experts_spec(family_experts(model_type), name="layer.experts", supports=ALL_FEATURES - {feature})


def test_call_layouts_are_outside_the_kernels_math():
    with pytest.raises(
        OperatorError, match=r"'layer\.experts' \(MuseSparkExperts\): post-expert norm is not supported"
    ):
        experts_spec(family_experts("muse_spark"), name="layer.experts", supports=KERNEL_FEATURES)


def test_every_layout_passes_the_default_supports():
    for model_type in (
        "qwen3_moe",
        "gpt_oss",
        "nemotron_h",
        "deepseek_v4",
        "muse_spark",
        "llama4",
        "dbrx",
        "longcat_flash",
    ):
        experts_spec(family_experts(model_type))  # no error: cpu_experts and torch_experts run all of these


def test_features_and_description():
    spec = experts_spec(family_experts("gpt_oss"))
    assert spec.features == {"activation gptoss_swiglu", "transposed", "interleaved", "bias"}
    assert spec.describe() == "gated gptoss_swiglu(limit=7, alpha=1.702), bias, interleaved, transposed"
    assert experts_spec(family_experts("nemotron_h"), supports=ALL_FEATURES).describe() == "not gated, relu2"


def test_spec_defaults_keep_gpt_oss_interleaved():
    # Specs built by hand (older callers) keep GPT-OSS's convention: its swiglu implies interleaved gate/up.
    common = dict(num_experts=2, hidden_size=4, intermediate_size=2, has_bias=False)
    assert ExpertsSpec(activation="gptoss_swiglu", **common).interleaved is True
    assert ExpertsSpec(activation="silu", **common).interleaved is False
    assert ExpertsSpec(activation="gptoss_swiglu", interleaved=False, **common).interleaved is False


def test_split_gate_up_concatenated_interleaved_and_transposed():
    common = dict(num_experts=1, hidden_size=3, intermediate_size=2, has_bias=False)
    rows = torch.arange(4.0)[None, :, None].expand(1, 4, 3)  # row r holds the value r
    gate, up = split_gate_up(rows, ExpertsSpec(activation="silu", **common), transposed=False)
    assert gate[0, :, 0].tolist() == [0.0, 1.0] and up[0, :, 0].tolist() == [2.0, 3.0]
    gate, up = split_gate_up(rows, ExpertsSpec(activation="silu", interleaved=True, **common), transposed=False)
    assert gate[0, :, 0].tolist() == [0.0, 2.0] and up[0, :, 0].tolist() == [1.0, 3.0]
    gate, up = split_gate_up(rows.transpose(1, 2), ExpertsSpec(activation="silu", **common), transposed=True)
    assert gate.shape == (1, 2, 3) and up[0, :, 0].tolist() == [2.0, 3.0]
    with pytest.raises(OperatorError, match="not gated"):
        split_gate_up(rows, ExpertsSpec(activation="relu2", gated=False, **common), transposed=False)


def test_canonical_weights_of_a_non_gated_module():
    module = family_experts("nemotron_h")
    spec = experts_spec(module, supports=ALL_FEATURES)
    weights = canonical_weights(module, spec)
    assert weights.gate is None
    assert torch.equal(weights.up, module.up_proj) and torch.equal(weights.down, module.down_proj)
    assert weight_names(spec) == ["up_proj", "down_proj"]


def test_canonical_weights_of_dbrx_flat_storage():
    module = family_experts("dbrx")
    spec = experts_spec(module, supports=ALL_FEATURES)
    weights = canonical_weights(module, spec)
    e, i, h = spec.num_experts, spec.intermediate_size, spec.hidden_size
    assert torch.equal(weights.gate[3], module.mlp.w1[3 * i : 4 * i])
    assert torch.equal(weights.down[3], module.mlp.w2[3 * i : 4 * i].T)
    assert weights.down.shape == (e, h, i)


def _softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(x / cap)


@pytest.mark.parametrize(
    ("activation", "params", "formula"),
    [
        (
            "gptoss_swiglu",
            dict(swiglu_limit=7.0, swiglu_alpha=1.702),
            lambda g, u: (u.clamp(-7, 7) + 1) * g.clamp(max=7) * torch.sigmoid(1.702 * g.clamp(max=7)),
        ),
        (
            "clamped_swiglu",
            dict(swiglu_limit=10.0),
            lambda g, u: nn.functional.silu(g.clamp(max=10)) * u.clamp(-10, 10),
        ),
        (
            "swiglu_clamp_after",
            dict(swiglu_limit=7.0),
            lambda g, u: nn.functional.silu(g).clamp(max=7) * u.clamp(-7, 7),
        ),
        (
            "softcapped_swiglu",
            dict(softcap_gate=4.0, softcap_up=25.0),
            lambda g, u: _softcap(g, 4.0) * torch.sigmoid(g) * _softcap(u, 25.0),
        ),
        ("relu2", {}, lambda g, u: torch.relu(g) ** 2 * u),
        ("quick_gelu", {}, lambda g, u: g * torch.sigmoid(1.702 * g) * u),
    ],
)
def test_apply_activation_reference_math(activation, params, formula):
    g = torch.linspace(-30, 30, 101)
    u = torch.linspace(40, -40, 101)
    spec = ExpertsSpec(
        num_experts=1, hidden_size=1, intermediate_size=101, activation=activation, has_bias=False, **params
    )
    torch.testing.assert_close(apply_activation(g, u, spec), formula(g, u), rtol=1e-6, atol=1e-5)


def test_apply_activation_not_gated_uses_up_only():
    spec = ExpertsSpec(
        num_experts=1, hidden_size=1, intermediate_size=3, activation="relu2", has_bias=False, gated=False
    )
    assert apply_activation(None, torch.tensor([-1.0, 2.0, 3.0]), spec).tolist() == [0.0, 4.0, 9.0]


def test_looks_like_experts():
    assert looks_like_experts(mixtral_experts())
    assert looks_like_experts(family_experts("nemotron_h"))  # up_proj only
    assert looks_like_experts(family_experts("dbrx"))  # flat mlp.w1/v1/w2
    assert not looks_like_experts(nn.Linear(4, 4))
    shared = [m for n, m in family_model("inkling_mm_model").named_modules() if n.endswith("mlp.shared_experts")][0]
    assert not looks_like_experts(shared)  # InklingSharedExperts: gate_proj/up_proj/down_proj, always on


def test_mismatched_shapes_are_an_operator_error():
    module = mixtral_experts()
    module.down_proj = nn.Parameter(torch.zeros(4, 16, 5))
    with pytest.raises(
        OperatorError,
        match=r"'e' \(MixtralExperts\): .*gate_up_proj \(4, 16, 16\) and down_proj \(4, 16, 5\) "
        r"do not describe the same experts",
    ):
        experts_spec(module, name="e")


def test_extra_gate_up_rows_without_identity_experts_are_an_operator_error():
    module = mixtral_experts()
    module.gate_up_proj = nn.Parameter(torch.zeros(6, 16, 16))
    with pytest.raises(OperatorError, match="gate_up_proj has 6 experts but down_proj 4"):
        experts_spec(module, name="e")
