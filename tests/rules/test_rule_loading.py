"""Rule files: includes, order, vars, plain lists, built-in names, strings."""

import textwrap

import pytest
import torch

import ktinject
from ktinject.rules.builtin import MODEL_TYPE_RULES, builtin_rule_path


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def test_own_rules_come_before_included_ones_and_vars_override(tmp_path):
    write(
        tmp_path,
        "base/shared.yaml",
        """
        vars: {where: cpu, dtype: float32}
        rules:
          - name: base-rule
            match: {name: 'proj$'}
            replace: {op: torch_linear, device: '${vars.where}', kwargs: {dtype: '${vars.dtype}'}}
    """,
    )
    top = write(
        tmp_path,
        "top.yaml",
        """
        include: [base/shared.yaml]
        vars: {dtype: bfloat16}
        rules:
          - name: top-rule
            match: {name: 'q_proj$'}
            replace: {op: keep, device: meta}
    """,
    )
    rs = ktinject.load_rules(top)
    assert [r.label for r in rs] == ["top-rule", "base-rule"]
    assert rs.rules[1].replace.kwargs == {"dtype": "bfloat16"}  # the including file's value wins
    assert rs.rules[1].replace.device == torch.device("cpu")
    rs2 = ktinject.load_rules(top, vars={"where": "meta"})  # the caller's value wins over every file
    assert rs2.rules[1].replace.device == torch.device("meta")
    assert rs.rules[0].location.line == 4 and rs.rules[0].location.file == str(top)


def test_diamond_include_reads_each_file_once(tmp_path):
    write(tmp_path, "base.yaml", "rules:\n  - {name: b, match: {name: x}, replace: {op: keep, device: cpu}}\n")
    write(tmp_path, "left.yaml", "include: [base.yaml]\n")
    write(tmp_path, "right.yaml", "include: [base.yaml]\n")
    top = write(tmp_path, "top.yaml", "include: [left.yaml, right.yaml]\n")
    assert [r.label for r in ktinject.load_rules(top)] == ["b"]


def test_plain_list_file_and_yaml_string(tmp_path):
    path = write(tmp_path, "list.yaml", "- match: {name: 'a'}\n  replace: {op: keep, device: cpu}\n")
    assert len(ktinject.load_rules(path)) == 1
    rs = ktinject.load_rules("- match: {class: Linear}\n  replace: {op: torch_linear, device: cpu}\n")
    assert rs.rules[0].match.class_name == "Linear"


def test_dotted_class_and_operator_paths():
    rs = ktinject.load_rules(
        "rules:\n  - match: {class: torch.nn.Linear}\n    replace: {op: ktinject.operators.torch_linear.TorchLinear, device: cpu}\n"
    )
    rule = rs.rules[0]
    assert rule.match.class_type is torch.nn.Linear
    assert rule.replace.op_class.op_name == "torch_linear"


def test_every_builtin_file_loads_and_auto_names_exist():
    names = ktinject.builtin_rule_names()
    for family in ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss", "llama"):
        assert family in names
    for name in names:
        ktinject.load_rules(name, vars={"gpu": "cpu"})
    for rule_file in MODEL_TYPE_RULES.values():
        assert builtin_rule_path(rule_file) is not None


def test_builtin_lookup_cannot_escape_the_rules_directory():
    assert builtin_rule_path("../pyproject") is None


def test_auto_needs_a_known_model_type():
    with pytest.raises(ktinject.RuleError, match="no built-in rules for model_type 'bert'"):
        ktinject.load_rules("auto", model_type="bert")


def test_readme_rule_example_plans_a_qwen3_moe_cleanly(caplog):
    """The rule file on the README's first screen plans a real Qwen3-MoE (a tiny one built in code): every rule,
    its own and the included ones, claims a module; nothing is left unplaced; nothing is logged as a warning."""
    import logging
    from pathlib import Path

    from tiny_models import tiny_model

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("```yaml\n# my_rules.yaml") + len("```yaml\n")
    rules = ktinject.load_rules(readme[start : readme.index("```", start)], vars={"gpu": "cpu"})
    assert rules.rules[0].replace.op == "cpu_experts" and rules.rules[0].replace.config.numa_nodes == 2
    with caplog.at_level(logging.WARNING, logger="ktinject"):
        plan = ktinject.plan(tiny_model("qwen3_moe"), rules)
    assert not plan.suspicious_unmatched_rules, [r.label for r in plan.unmatched_rules]
    assert not plan.uncovered_modules and "warning" not in str(plan)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    experts = {e.module_name: e for e in plan if e.op == "cpu_experts"}
    assert experts["model.layers.0.mlp.experts"].rule.replace.config.weight_type == "q8_0"
    # the user's rule for layer 0's experts wins over the built-in whole-layer rule, which says so in the plan
    assert [(name, part) for name, _, part, _ in plan.yielded] == [("model.layers.0", "model.layers.0.mlp.experts")]
    assert "note: rule decoder-layers left model.layers.0 to its parts" in str(plan)
    layers = {e.module_name: e for e in plan if e.op == "decoder_layer"}
    assert layers["model.layers.2"].rule.replace.config.experts_weight_type == "q4_k"  # the built-in rule, via vars
