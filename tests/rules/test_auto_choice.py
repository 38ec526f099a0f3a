"""``rules="auto"``: the family's built-in file when one ships, else generic rules chosen by the model's structure;
the choice and its reason are in the plan."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from full_size_configs import DEEPSEEK_V3
from transformers import AutoConfig, AutoModelForCausalLM

import ktinject
from ktinject import OperatorError, RuleError
from ktinject.families.tiny import tiny_model
from ktinject.loading.model import build_meta_model
from ktinject.rules import choose_auto_rules

CPU = {"gpu": "cpu"}


def dense_model() -> torch.nn.Module:
    config = AutoConfig.for_model(
        "olmo2",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return AutoModelForCausalLM.from_config(config)


def test_a_family_with_a_builtin_file_gets_it():
    plan = ktinject.plan(tiny_model("qwen3_moe"), "auto", vars=CPU)
    assert plan.rules.origin == "auto: built-in rules 'qwen3_moe' for model_type 'qwen3_moe'"
    assert plan.rules.origin in str(plan)
    assert any(f.endswith("qwen3_moe.yaml") for f in plan.rules.files)


def test_a_moe_family_without_a_file_gets_the_generic_moe_rules(caplog):
    model = tiny_model("olmoe")
    with caplog.at_level(logging.INFO, logger="ktinject"):
        plan = ktinject.plan(model, "auto", vars=CPU)
    reason = "auto: no built-in file for model_type 'olmoe'; generic MoE rules (2 experts modules found by structure)"
    assert plan.rules.origin == reason and reason in caplog.text
    assert reason in str(plan).splitlines()
    experts = [e.module_name for e in plan if e.op == "cpu_experts"]
    assert experts == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    # OLMoE's attention norms q and k over the whole projection: transformers' module stays, projections are ours
    assert not plan.suspicious_unmatched_rules and not plan.uncovered_modules
    assert [r.label for r in plan.unmatched_rules] == ["decoder-layers", "attention"]


def test_a_dense_model_without_a_file_gets_the_dense_rules():
    plan = ktinject.plan(dense_model(), "auto", vars=CPU)
    assert (
        plan.rules.origin
        == "auto: no built-in file for model_type 'olmo2'; no experts module found: generic dense rules"
    )
    assert {e.op for e in plan} == {"linear", "keep"} and not plan.suspicious_unmatched_rules


def test_auto_without_a_model_needs_a_known_model_type():
    with pytest.raises(RuleError) as info:
        ktinject.load_rules("auto", model_type="olmoe")
    assert "no built-in rules for model_type 'olmoe'" in str(info.value)
    assert "no model to recognise its experts in" in str(info.value)
    with pytest.raises(RuleError, match="needs the model"):
        choose_auto_rules(None)
    assert choose_auto_rules("kimi_k2").name == "deepseek_v3"


def test_optimize_with_auto_runs_a_family_without_a_rule_file():
    model = tiny_model("olmoe")
    ids = torch.arange(3, 9)[None]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    plan = ktinject.optimize(model, "auto", vars=CPU)
    assert plan.rules.origin.startswith("auto: no built-in file for model_type 'olmoe'")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=1e-4)


def test_experts_cpu_experts_cannot_run_fail_at_plan_time_in_one_line():
    model = tiny_model("qwen3_moe")
    experts = model.model.layers[1].mlp.experts
    experts.act_fn = torch.nn.Tanh()  # an activation no kernel computes
    with pytest.raises(OperatorError) as info:
        ktinject.plan(model, "auto", vars=CPU)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("rule routed-experts-on-cpu (")
    assert "matches model.layers.1.mlp.experts (Qwen3MoeExperts), which cpu_experts cannot replace" in message
    assert "computes none of the known activations" in message


def test_auto_plans_a_deepseek_v3_sized_model_quickly():
    values = dict(DEEPSEEK_V3)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    model = build_meta_model(config)
    ktinject.plan(model, "base/moe", vars=CPU)  # reads the rule files and transformers' class index once
    for rules in ("auto", "base/moe"):  # the family file, and the generic rules that test every module's kind
        start = time.perf_counter()
        plan = ktinject.plan(model, rules, vars=CPU)
        assert time.perf_counter() - start < 3.0
        assert sum(e.op == "cpu_experts" for e in plan) == 58
