"""Variables set from outside (vars= / --set) must be declared by the rule files."""

import pytest

import ktinject
from ktinject import RuleError

RULES = (
    "vars: {gpu: cpu, cpu_threads: 0}\nrules:\n  - match: {name: x}\n    replace: {op: keep, device: '${vars.gpu}'}\n"
)


def error_of(rules, **kwargs) -> str:
    with pytest.raises(RuleError) as info:
        ktinject.load_rules(rules, **kwargs)
    assert len(str(info.value).splitlines()) == 1
    return str(info.value)


def test_declared_variables_are_overridden():
    assert str(ktinject.load_rules(RULES, vars={"gpu": "meta"}).rules[0].replace.device) == "meta"


def test_unknown_variable_lists_the_known_ones_and_suggests():
    message = error_of(RULES, vars={"cpu_thread": 8})
    assert message == (
        "<string>: vars.cpu_thread: unknown variable 'cpu_thread' given by vars= / --set "
        "(the rule files declare: cpu_threads, gpu); did you mean 'cpu_threads'?"
    )


def test_unknown_variable_of_an_included_file_set(tmp_path):
    (tmp_path / "base.yaml").write_text("vars: {experts_class: x}\n")
    top = tmp_path / "top.yaml"
    top.write_text("include: [base.yaml]\nvars: {gpu: cpu}\n")
    assert ktinject.load_rules(top, vars={"experts_class": "y"}).vars["experts_class"] == "y"  # declared by an include
    assert error_of(top, vars={"nosuch": 1}).startswith(f"{top}: vars.nosuch: unknown variable 'nosuch'")


def test_builtin_rules_reject_misspelt_overrides():
    message = error_of("qwen3_moe", vars={"gpu": "cpu", "cpu_thread": 8})
    assert "unknown variable 'cpu_thread'" in message and "did you mean 'cpu_threads'?" in message


def test_rules_without_variables():
    message = error_of("rules: []\n", vars={"gpu": "cpu"})
    assert message == "<string>: vars.gpu: unknown variable 'gpu': the rule files declare no variables (vars:)"


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({1: "x"}, "variable names given by vars= / --set must be strings, got 1"),
        (
            {"gpu": object()},
            r"vars.gpu: a variable's value must be a string, number, boolean, null, list or mapping, got object",
        ),
        ({"gpu": 10**40}, "a variable's integer must fit in 64 bits"),
        (["gpu"], "vars= must be a mapping of variable names to values, got list"),
    ],
)
def test_bad_overrides(overrides, fragment):
    assert fragment in error_of(RULES, vars=overrides)


def test_cyclic_override_value_is_bounded():
    loop: list = []
    loop.append(loop)
    assert "nested more than" in error_of(RULES, vars={"gpu": loop})
