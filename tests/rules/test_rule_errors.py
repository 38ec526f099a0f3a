"""Every rule mistake is a one-line RuleError naming file:line and the key."""

import re
import textwrap

import pytest

import ktinject
from ktinject import RuleError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def error_of(path, **kwargs) -> str:
    with pytest.raises(RuleError) as info:
        ktinject.load_rules(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, ValueError)
    return message


GOOD_RULE = """
rules:
  - name: ok
    match: {name: 'experts$'}
    replace: {op: torch_experts, device: cpu}
"""


@pytest.mark.parametrize(
    "body, line, key, fragment",
    [
        ("rulez: []\n", 1, "rulez", "unknown key 'rulez'.*did you mean 'rules'"),
        (
            "rules:\n  - matc: {name: x}\n    replace: {op: keep, device: cpu}\n",
            2,
            r"rules\[0\]\.matc",
            "unknown key 'matc'",
        ),
        (
            "rules:\n  - match: {nam: x}\n    replace: {op: keep, device: cpu}\n",
            2,
            r"rules\[0\]\.match\.nam",
            "did you mean 'name'",
        ),
        (
            "rules:\n  - match: {name: x}\n    replace:\n      op: keep\n      devise: cpu\n",
            5,
            r"rules\[0\]\.replace\.devise",
            "unknown key",
        ),
        (
            "rules:\n  - match:\n      name: 'layers\\.(\\d+'\n    replace: {op: keep, device: cpu}\n",
            3,
            r"rules\[0\]\.match\.name",
            "bad regex",
        ),
        (
            "rules:\n  - match: {name: x}\n    replace:\n      op: cpu_expertz\n      device: cpu\n",
            4,
            r"rules\[0\]\.replace\.op",
            "unknown operator 'cpu_expertz'",
        ),
        (
            "rules:\n  - match: {name: x}\n    replace: {op: no.such.module.Op, device: cpu}\n",
            3,
            r"rules\[0\]\.replace\.op",
            "cannot import operator",
        ),
        (
            "rules:\n  - match:\n      class: Qwen3MoeExpert\n    replace: {op: keep, device: cpu}\n",
            3,
            r"rules\[0\]\.match\.class",
            "did you mean 'Qwen3MoeExperts'",
        ),
        (
            "rules:\n  - match: {class: no_such.Thing}\n    replace: {op: keep, device: cpu}\n",
            2,
            r"rules\[0\]\.match\.class",
            "cannot import class",
        ),
        (
            "rules:\n  - match: {name: x}\n    replace:\n      op: keep\n      device: gpu0\n",
            5,
            r"rules\[0\]\.replace\.device",
            "bad device 'gpu0'",
        ),
        (
            "rules:\n  - match: {name: x}\n    replace: {op: keep, device: 'cuda:x'}\n",
            3,
            r"rules\[0\]\.replace\.device",
            "bad device",
        ),
        (
            "rules:\n  - match: {name: x}\n    replace: {op: keep}\n",
            3,
            r"rules\[0\]\.replace",
            "replace.device is required",
        ),
        ("rules:\n  - match: {name: x}\n", 2, r"rules\[0\]\.replace", "needs a replace mapping"),
        ("rules:\n  - replace: {op: keep, device: cpu}\n", 2, r"rules\[0\]\.match", "needs a match mapping"),
        (
            "rules:\n  - match: {name: x}\n    replace:\n      op: torch_experts\n      device: cpu\n      kwargs: {dtype: float8}\n",
            6,
            r"rules\[0\]\.replace\.kwargs\.dtype",
            "must be one of",
        ),
        (
            "rules:\n  - match: {name: x}\n    replace:\n      op: torch_experts\n      device: cpu\n      kwargs: {threads: 2}\n",
            6,
            r"rules\[0\]\.replace\.kwargs\.threads",
            "unknown kwarg 'threads'",
        ),
        (
            "rules:\n  - match: {name: x}\n    replace: {op: keep, device: cpu}\n    recursive: maybe\n",
            4,
            r"rules\[0\]\.recursive",
            "true or false",
        ),
        (
            "rules:\n  - match: {name: x}\n    replace: {op: keep, device: '${vars.nope}'}\n",
            3,
            r"rules\[0\]\.replace\.device",
            "cannot resolve",
        ),
        ("rules:\n  - match: {name: x}\n    match: {name: y}\n", 3, r"rules\[0\]\.match", "duplicate key 'match'"),
        ("rules: !!python/object:os.system {}\n", 1, "<yaml>", "Python tags are not allowed"),
        ("rules: [\n", 2, "<yaml>", ""),
        ("rules: 5\n", 1, "rules", "rules must be a list"),
        ("- just a string\n", 1, r"rules\[0\]", "a rule must be a mapping"),
    ],
)
def test_rule_errors_name_file_line_and_key(tmp_path, body, line, key, fragment):
    path = write(tmp_path, "r.yaml", body)
    message = error_of(path)
    assert re.match(rf"^{re.escape(str(path))}:{line}: {key}: ", message), message
    assert re.search(fragment, message), message


def test_missing_include_names_the_including_file(tmp_path):
    path = write(tmp_path, "top.yaml", "include: [nothere.yaml]\n" + GOOD_RULE)
    message = error_of(path)
    assert message.startswith(f"{path}:1: include[0]: included file 'nothere.yaml' not found")


def test_include_cycle(tmp_path):
    write(tmp_path, "a.yaml", "include: [b.yaml]\n")
    b = write(tmp_path, "b.yaml", "rules: []\ninclude: [a.yaml]\n")
    message = error_of(tmp_path / "a.yaml")
    assert message.startswith(f"{b}:2: include[0]: include cycle: ")
    assert "a.yaml -> " in message and message.endswith("a.yaml")


def test_error_in_included_file_points_into_that_file(tmp_path):
    inc = write(tmp_path, "inc.yaml", "rules:\n  - match: {name: x}\n    replace: {op: keep, device: tpu}\n")
    top = write(tmp_path, "top.yaml", "include: [inc.yaml]\n" + GOOD_RULE)
    assert error_of(top).startswith(f"{inc}:3: rules[0].replace.device: bad device 'tpu'")


def test_missing_rule_file():
    with pytest.raises(RuleError, match=r"no_such_file\.yaml.* is not a rule file, a built-in rule name or YAML text"):
        ktinject.load_rules("no_such_file.yaml")


def test_unreadable_path(tmp_path):
    with pytest.raises(RuleError, match=r":1: <file>: cannot read rule file"):
        ktinject.load_rules(tmp_path / "missing.yaml")


def test_yaml_string_errors_say_string():
    with pytest.raises(RuleError, match=r"^<string>:2: rules\[0\]\.match: "):
        ktinject.load_rules("rules:\n  - replace: {op: keep, device: cpu}\n")
