"""plan(): a dry run with a readable table, unmatched rules and uncovered modules listed."""

import pytest
import torch
from tiny_models import tiny_model

import ktinject

RULES = """
rules:
  - name: experts
    match: {name: '\\.mlp\\.experts$', class: Qwen3MoeExperts}
    replace: {op: torch_experts, device: cpu}
  - name: attention-q
    match: {name: 'self_attn\\.q_proj$'}
    replace: {op: torch_linear, device: cpu, kwargs: {dtype: bfloat16}}
  - name: never-matches
    match: {class: MixtralExperts}
    replace: {op: keep, device: cpu}
"""


def test_plan_changes_nothing_and_lists_entries():
    model = tiny_model("qwen3_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = ktinject.plan(model, RULES)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    names = [(e.module_name, e.rule.label, e.op, str(e.device)) for e in plan]
    assert ("model.layers.0.mlp.experts", "experts", "torch_experts", "cpu") in names
    assert ("model.layers.2.self_attn.q_proj", "attention-q", "torch_linear", "cpu") in names
    assert "model.layers.1.mlp.experts" not in {n for n, *_ in names}  # layer 1 is dense (mlp_only_layers)
    assert [r.label for r in plan.unmatched_rules] == ["never-matches"]
    assert "model.embed_tokens" in plan.uncovered_modules


def test_plan_table_groups_layers_and_warns():
    text = str(ktinject.plan(tiny_model("qwen3_moe"), RULES))
    lines = text.splitlines()
    assert lines[0].split() == ["module", "class", "rule", "op", "device", "memory"]
    assert any(l.startswith("model.layers.{0,2}.mlp.experts ") and "torch_experts" in l for l in lines)
    assert any(l.startswith("model.layers.{0-2}.self_attn.q_proj ") for l in lines)
    assert "5 modules claimed by 2 of 3 rules" in text
    assert "warning: rule never-matches" in text and "matched no module" in text
    assert "not placed by any rule" in text


def test_keep_estimates_exclude_claimed_children():
    model = tiny_model("qwen3_moe")
    plan = ktinject.plan(model, "qwen3_moe", vars={"gpu": "cpu"})
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    # every tensor counted exactly once across entries (the experts' torch estimate equals their bytes)
    assert sum(e.estimated_bytes for e in plan) == total
    assert not plan.uncovered_modules


def test_non_recursive_keep_claims_the_whole_subtree():
    model = tiny_model("qwen3_moe")
    rules = """
    - match: {name: '^model\\.layers\\.0$'}
      replace: {op: keep, device: cpu}
      recursive: false
    - match: {name: 'experts$'}
      replace: {op: torch_experts, device: cpu}
    """
    plan = ktinject.plan(model, rules)
    assert [e.module_name for e in plan if e.op == "torch_experts"] == ["model.layers.2.mlp.experts"]


def test_an_operator_matched_to_a_module_it_cannot_replace_fails_at_plan_time():
    model = tiny_model("qwen3_moe")
    rules = """
    - name: experts-rule-on-the-block
      match: {name: 'layers\\.0\\.mlp$'}
      replace: {op: cpu_experts, device: cpu}
    """
    with pytest.raises(
        ktinject.OperatorError,
        match=r"rule experts-rule-on-the-block \(.*\) matches model\.layers\.0\.mlp "
        r"\(Qwen3MoeSparseMoeBlock\), which cpu_experts cannot replace: .*not a fused experts module",
    ):
        ktinject.plan(model, rules)
