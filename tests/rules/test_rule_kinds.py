"""``match.kind``: rules that recognise a module by what it is, wherever it sits and whatever its class."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

import ktinject
from ktinject import RuleError
from ktinject.families.tiny import tiny_model
from ktinject.rules.kinds import KINDS

EXPERTS_ON_CPU = """
rules:
  - name: experts
    match: {kind: experts}
    replace: {op: torch_experts, device: cpu}
"""


@pytest.mark.parametrize(
    "model_type, path",
    [
        ("qwen3_moe", "model.layers.{}.mlp.experts"),
        ("granitemoe", "model.layers.{}.block_sparse_moe.experts"),
        ("jamba", "model.layers.{}.feed_forward.experts"),
        ("dbrx", "transformer.blocks.{}.ffn.experts"),
        ("gemma4", "model.language_model.layers.{}.experts"),
        ("qwen3_vl_moe", "model.language_model.layers.{}.mlp.experts"),
    ],
)
def test_kind_experts_finds_the_experts_wherever_they_sit(model_type, path):
    plan = ktinject.plan(tiny_model(model_type), EXPERTS_ON_CPU)
    assert [e.module_name for e in plan] == [path.format(i) for i in range(2)]


def test_kind_experts_skips_a_shared_experts_mlp_named_experts():
    # Inkling's InklingSharedExperts is the always-on shared MLP (Linear projections), not routed experts.
    plan = ktinject.plan(tiny_model("inkling_mm_model"), EXPERTS_ON_CPU)
    assert plan.entries and all(e.module_name.endswith("mlp.experts") for e in plan)


def test_kind_with_name_and_class_must_all_hold():
    model = tiny_model("ernie4_5_vl_moe")  # a text and a vision experts module per layer
    rules = "rules:\n  - match: {kind: experts, name: 'text_moe'}\n    replace: {op: torch_experts, device: cpu}\n"
    assert [e.module_name for e in ktinject.plan(model, rules)] == [
        f"model.language_model.layers.{i}.mlp.text_moe.experts" for i in range(2)
    ]
    rules = (
        "rules:\n  - match: {kind: experts, class: Qwen3MoeExperts}\n    replace: {op: torch_experts, device: cpu}\n"
    )
    assert not ktinject.plan(model, rules).entries


class _Grouped(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # a different computation over the same weight
        return super().forward(x) * 2


class _Named(nn.Linear):
    """A subclass that only renames: it computes nn.Linear's forward."""


def test_kind_linear_is_a_module_computing_nn_linear():
    linear = KINDS["linear"]
    assert linear(nn.Linear(4, 4)) and linear(_Named(4, 4))
    assert not linear(_Grouped(4, 4)) and not linear(nn.Conv1d(4, 4, 1))


def test_builtin_dense_rules_leave_a_linear_with_its_own_forward_alone():
    # DeepSeek-V4's grouped o_a_proj is an nn.Linear subclass computing a block-diagonal product.
    plan = ktinject.plan(tiny_model("deepseek_v4"), "base/moe", vars={"gpu": "cpu"})
    claimed = {e.module_name: e.op for e in plan}
    assert "model.layers.0.self_attn.o_a_proj" not in claimed
    assert claimed["model.layers.0.self_attn.o_b_proj"] == "linear"


def test_kind_is_shown_in_the_rule_set():
    rules = ktinject.load_rules(EXPERTS_ON_CPU)
    assert rules.rules[0].match.describe() == "kind=experts"
    assert "experts: kind=experts -> torch_experts@cpu" in str(rules)


@pytest.mark.parametrize(
    "value, fragment",
    [
        (
            "expert",
            "unknown kind 'expert' (known: experts, attention, decoder_layer, rmsnorm, router, linear); did you mean 'experts'?",
        ),
        (
            "Experts_",
            "unknown kind 'Experts_' (known: experts, attention, decoder_layer, rmsnorm, router, linear); did you mean 'experts'?",
        ),
        ("[experts]", "unknown kind ['experts'] (known: experts, attention, decoder_layer, rmsnorm, router, linear)"),
        ("3", "unknown kind 3 (known: experts, attention, decoder_layer, rmsnorm, router, linear)"),
    ],
)
def test_unknown_kind_is_a_one_line_rule_error_at_its_line(tmp_path, value, fragment):
    path = tmp_path / "r.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        rules:
          - name: a
            match: {{name: x}}
            replace: {{op: keep, device: cpu}}
          - match:
              kind: {value}
            replace: {{op: torch_experts, device: cpu}}
        """)
    )
    with pytest.raises(RuleError) as info:
        ktinject.load_rules(path)
    assert str(info.value) == f"{path}:6: rules[1].match.kind: {fragment}"


def test_kind_comes_from_a_variable():
    rules = ktinject.load_rules(
        "vars: {what: experts}\nrules:\n  - match: {kind: '${vars.what}'}\n"
        "    replace: {op: torch_experts, device: cpu}\n"
    )
    assert rules.rules[0].match.kind is KINDS["experts"]
