"""``--set KEY=VALUE``: values are bounded YAML, bad ones and unknown names are one-line errors."""

import pytest

from ktinject import RuleError
from ktinject.cli import main
from ktinject.cli.common import parse_vars


def test_values_are_read_as_yaml():
    assert parse_vars(["gpu=cpu", "cpu_threads=8", "flag=true", "dev=cuda:0", "empty=", " spaced = x"]) == {
        "gpu": "cpu",
        "cpu_threads": 8,
        "flag": True,
        "dev": "cuda:0",
        "empty": "",
        "spaced": "x",
    }


@pytest.mark.parametrize(
    "item, fragment",
    [
        ("gpu=[", r"^--set 'gpu=\[': the value is not valid YAML: did not find expected node content"),
        ("x=!!python/object:os.system {}", r"Python tags are not allowed"),
        ("x=a: b: c", r"mapping values are not allowed"),
        ("x=\x07", r"character U\+0007"),
        ("novalue", r"^--set expects KEY=VALUE, got 'novalue'"),
    ],
)
def test_bad_values_are_one_line_rule_errors(item, fragment):
    with pytest.raises(RuleError, match=fragment) as info:
        parse_vars([item])
    assert len(str(info.value).splitlines()) == 1


def test_cli_reports_bad_set_on_one_line(capsys):
    assert main(["validate", "llama", "--set", "gpu=["]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set 'gpu=[': the value is not valid YAML") and err.count("\n") == 1


def test_cli_rejects_unknown_variables_with_a_suggestion(capsys):
    assert main(["validate", "qwen3_moe", "--set", "cpu_thread=8"]) == 2
    err = capsys.readouterr().err
    assert "vars.cpu_thread: unknown variable 'cpu_thread' given by vars= / --set" in err
    assert "cpu_threads, experts_class" in err and "did you mean 'cpu_threads'?" in err and err.count("\n") == 1
