"""Hostile rule files: bounded work, and every failure one RuleError line that names the real file:line."""

import re
import textwrap
import time

import pytest

import ktinject
from ktinject import RuleError
from ktinject.rules import limits

GOOD = "rules:\n  - match: {name: x}\n    replace: {op: keep, device: cpu}\n"


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def error_of(rules, **kwargs) -> str:
    with pytest.raises(RuleError) as info:
        ktinject.load_rules(rules, **kwargs)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    return message


def expect(path, line, key, fragment, **kwargs):
    message = error_of(path, **kwargs)
    assert re.match(rf"{re.escape(str(path))}:{line}: {key}: ", message), message
    assert re.search(fragment, message), message
    return message


def test_alias_bomb_is_refused_quickly(tmp_path):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]  # 9**10 values once expanded
    path = write(tmp_path, "vars:\n" + "".join(f"  {line}\n" for line in levels) + GOOD)
    start = time.monotonic()
    expect(path, 7, "<yaml>", rf"more than {limits.MAX_NODES:,} values once aliases are expanded")
    assert time.monotonic() - start < 5


def test_aliases_within_the_limit_load_and_errors_point_at_the_alias(tmp_path):
    path = write(
        tmp_path,
        """
        rules:
          - &cpu_rule {name: a, match: {name: x}, replace: {op: keep, device: cpu}}
          - *cpu_rule
          - {name: c, match: {name: y}, replace: &r {op: keep, device: meta}}
          - {name: d, match: {name: z}, replace: {<<: *r, device: cpu}}
    """,
    )
    rules = ktinject.load_rules(path)
    assert [r.label for r in rules] == ["a", "a", "c", "d"]
    assert str(rules.rules[3].replace.device) == "cpu"  # a merge key's own entries win
    bad = write(tmp_path, "rules:\n  - &r {match: {name: x}, replace: {op: keep, device: tpu}}\n  - *r\n", "bad.yaml")
    expect(bad, 2, r"rules\[0\]\.replace\.device", "bad device 'tpu'")


def test_recursive_alias(tmp_path):
    expect(
        write(tmp_path, "vars:\n  a: &a\n    - x\n    - *a\n" + GOOD),
        4,
        "<yaml>",
        r"alias \*a is inside the node &a it names",
    )


@pytest.mark.parametrize("opening, closing", [("[", "]"), ("{a: ", "}")])
def test_deep_nesting_is_an_error_not_a_recursion_error(tmp_path, opening, closing):
    path = write(tmp_path, "vars:\n  deep: " + opening * 1000 + "x" + closing * 1000 + "\n" + GOOD)
    expect(path, 2, "<yaml>", f"nested more than {limits.MAX_DEPTH} levels deep")


def test_deep_nesting_within_the_limit_loads(tmp_path):
    depth = limits.MAX_DEPTH - 3  # the document, vars and the variable take three levels
    assert (
        ktinject.load_rules(write(tmp_path, "vars:\n  deep: " + "[" * depth + "]" * depth + "\n" + GOOD)).vars["deep"]
        is not None
    )


def test_file_size_limit(tmp_path):
    path = write(tmp_path, GOOD + "# " + "x" * limits.MAX_FILE_BYTES + "\n")
    expect(path, 1, "<file>", rf"more than a rule file may hold \({limits.MAX_FILE_BYTES:,}\)")
    with pytest.raises(RuleError, match=r"^<string>:1: <file>: "):
        ktinject.load_rules(GOOD + "# " + "x" * limits.MAX_FILE_BYTES + "\n")


def test_invalid_utf8_names_the_line(tmp_path):
    path = write(tmp_path, GOOD.encode() + b"# caf\xe9\n")
    expect(path, 4, "<file>", r"byte 0xe9 is not UTF-8")


def test_control_character_names_its_line_once(tmp_path):
    path = write(tmp_path, GOOD + "# bell \x07\n")
    expect(path, 4, "<yaml>", r"character U\+0007 .* is not allowed")


def test_syntax_error_names_the_real_line_without_the_python_tag_hint(tmp_path):
    message = expect(
        write(tmp_path, "rules:\n  - match: {name: x}\n    replace: {op: keep, device: cpu\n    recursive: 'x\n"),
        4,
        "<yaml>",
        r"flow mapping on line 3",
    )
    assert "Python" not in message


def test_python_and_unknown_tags(tmp_path):
    expect(
        write(tmp_path, "rules:\n  - !!python/object/apply:os.system ['true']\n"),
        2,
        "<yaml>",
        r"Python tags are not allowed, found 'tag:yaml.org,2002:python/object/apply:os.system'",
    )
    message = expect(write(tmp_path, "vars: {a: !secret x}\n" + GOOD, "t.yaml"), 1, "<yaml>", "unknown tag '!secret'")
    assert "Python" not in message


def test_unreadable_scalar_values_name_their_line(tmp_path):
    expect(write(tmp_path, "vars:\n  a: 1\n  b: !!int twelve\n" + GOOD), 3, "<yaml>", "cannot read this int value")
    expect(
        write(tmp_path, "vars:\n  n: " + "9" * 5000 + "\n" + GOOD, "n.yaml"),
        2,
        "<yaml>",
        "a number of 5,000 characters",
    )


def test_second_document_and_complex_keys(tmp_path):
    expect(write(tmp_path, GOOD + "---\n" + GOOD), 4, "<yaml>", "one YAML document, but a second one starts here")
    expect(write(tmp_path, "? [a, b]\n: c\n", "k.yaml"), 1, "<yaml>", "a mapping key must be a plain value")


def test_duplicate_keys_in_nested_mappings(tmp_path):
    expect(
        write(
            tmp_path, "rules:\n  - match: {name: x}\n    replace:\n      op: keep\n      device: cpu\n      op: keep\n"
        ),
        6,
        r"rules\[0\]\.replace\.op",
        "duplicate key 'op'",
    )


@pytest.mark.parametrize("field, op", [("class", "keep"), ("op", None)])
@pytest.mark.parametrize("spec", [".foo", "foo.", "a..b", "1mod.X", "x.y-z"])
def test_malformed_dotted_paths(tmp_path, field, op, spec):
    if field == "class":
        body = f"rules:\n  - match:\n      class: '{spec}'\n    replace: {{op: keep, device: cpu}}\n"
        key = r"rules\[0\]\.match\.class"
    else:
        body = f"rules:\n  - match: {{name: x}}\n    replace:\n      op: '{spec}'\n      device: cpu\n"
        key = r"rules\[0\]\.replace\.op"
    expect(write(tmp_path, body), 3 if field == "class" else 4, key, re.escape(f"'{spec}' is neither"))


def test_non_string_and_bad_variable_names(tmp_path):
    expect(write(tmp_path, "vars:\n  1: a\n" + GOOD), 2, r"vars\[1\]", "variable name 1 must be a string")
    expect(
        write(tmp_path, "vars:\n  a b: 1\n" + GOOD, "s.yaml"), 2, r"vars\.a b", "variable name 'a b' must be a string"
    )
    path = write(
        tmp_path,
        "vars: {a: 1}\nrules:\n  - match: {name: x}\n    replace: {op: keep, device: '${vars.nope}'}\n",
        "u.yaml",
    )
    expect(path, 4, r"rules\[0\]\.replace\.device", r"cannot resolve '\$\{vars.nope\}'.*\(variables: a\)")


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("a" * 5000, "include name of 5,000 characters"),
        ("a" * 1000, "not found"),  # a path component longer than the OS takes names no file
        ("bad\u0000name", "holds control characters"),
        (".", "not found"),
        (5, "must be a file name"),
    ],
    ids=["5000-chars", "1000-char-component", "nul", "dot", "number"],
)
def test_bad_include_names(tmp_path, name, fragment):
    entry = f'"{name}"'.replace("\u0000", "\\0") if isinstance(name, str) else str(name)
    expect(write(tmp_path, f"include:\n  - {entry}\n" + GOOD), 2, r"include\[0\]", fragment)


def test_include_chain_depth(tmp_path):
    depth = limits.MAX_INCLUDE_DEPTH
    for i in range(depth + 1):
        write(tmp_path, f"include: [f{i + 1}.yaml]\n", f"f{i}.yaml")
    write(tmp_path, GOOD, f"f{depth + 1}.yaml")
    message = error_of(tmp_path / "f0.yaml")  # f0 .. f{depth - 1} are the chain; the last of them may not include
    assert message.startswith(
        f"{tmp_path / f'f{depth - 1}.yaml'}:1: include[0]: includes nested more than {depth} files deep"
    ), message
    assert len(ktinject.load_rules(tmp_path / "f2.yaml")) == 1  # a shorter chain loads


def test_rule_count_limit(tmp_path, monkeypatch):
    monkeypatch.setattr("ktinject.rules.loader.MAX_RULES", 3)
    path = write(tmp_path, "rules:\n" + "  - {match: {name: x}, replace: {op: keep, device: cpu}}\n" * 4)
    expect(path, 5, r"rules\[3\]", "more than 3 rules in this rule set")


def test_interpolation_that_doubles_per_variable_is_refused(tmp_path):
    lines = ["  v0: xxxxxxxxxx"] + [f"  v{i}: '${{vars.v{i - 1}}}${{vars.v{i - 1}}}'" for i in range(1, 15)]
    path = write(
        tmp_path,
        "vars:\n"
        + "\n".join(lines)
        + "\nrules:\n  - match: {name: '${vars.v14}'}\n    replace: {op: keep, device: cpu}\n",
    )
    start = time.monotonic()
    expect(
        path,
        18,
        r"rules\[0\]\.match\.name",
        rf"interpolation would produce more than {limits.MAX_INTERPOLATION_WORK:,} characters",
    )
    assert time.monotonic() - start < 5


def test_long_chains_of_variables_are_refused(tmp_path):
    lines = ["  v0: cpu"] + [f"  v{i}: '${{vars.v{i - 1}}}'" for i in range(1, 30)]
    path = write(
        tmp_path,
        "vars:\n"
        + "\n".join(lines)
        + "\nrules:\n  - match: {name: x}\n    replace: {op: keep, device: '${vars.v29}'}\n",
    )
    expect(path, 34, r"rules\[0\]\.replace\.device", r"more than 16 levels deep \(v29 -> v28 -> ")
    short = write(
        tmp_path,
        "vars:\n"
        + "\n".join(lines[:10])
        + "\nrules:\n  - match: {name: x}\n    replace: {op: keep, device: '${vars.v9}'}\n",
        "s.yaml",
    )
    assert str(ktinject.load_rules(short).rules[0].replace.device) == "cpu"


def test_recursive_variables(tmp_path):
    path = write(
        tmp_path,
        "vars: {a: '${vars.a}'}\nrules:\n  - match: {name: '${vars.a}'}\n    replace: {op: keep, device: cpu}\n",
    )
    expect(path, 3, r"rules\[0\]\.match\.name", "Recursive interpolation detected")


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("2024-01-01", "got date"),
        ("!!set {a, b}", "got set"),
        ("!!binary aGVsbG8=", "got bytes"),
    ],
)
def test_variable_values_must_be_plain_data(tmp_path, value, fragment):
    expect(write(tmp_path, f"vars:\n  gpu: cpu\n  odd: {value}\n" + GOOD), 3, r"vars\.odd", fragment)


def test_regex_limits(tmp_path):
    nested = "(" * 2000 + ")" * 2000
    expect(
        write(tmp_path, f"rules:\n  - match: {{name: '{nested}'}}\n    replace: {{op: keep, device: cpu}}\n"),
        2,
        r"rules\[0\]\.match\.name",
        "bad regex.*RecursionError",
    )
    long = "a" * (limits.MAX_REGEX_CHARS + 1)
    expect(
        write(tmp_path, f"rules:\n  - match: {{name: '{long}'}}\n    replace: {{op: keep, device: cpu}}\n", "l.yaml"),
        2,
        r"rules\[0\]\.match\.name",
        f"a regex of {limits.MAX_REGEX_CHARS + 1:,} characters",
    )


def test_huge_values_are_shortened_in_messages(tmp_path):
    message = expect(
        write(tmp_path, "rules:\n  - match: {name: x}\n    replace: {op: keep, device: '" + "c" * 100_000 + "'}\n"),
        3,
        r"rules\[0\]\.replace\.device",
        r"bad device 'c+'\.\.\. \(100,000 characters\)",
    )
    assert len(message) < 500


def test_newlines_in_values_and_paths_stay_on_one_line(tmp_path):
    message = expect(
        write(tmp_path, 'rules:\n  - match: {name: x}\n    replace: {op: keep, device: "cpu\\n:0"}\n'),
        3,
        r"rules\[0\]\.replace\.device",
        r"bad device 'cpu\\n:0'",
    )
    assert "\n" not in message


def test_cr_line_breaks_count_as_lines(tmp_path):
    path = write(tmp_path, b"rules:\r  - match: {name: x}\r    replace: {op: keep, device: tpu}\r")
    expect(path, 3, r"rules\[0\]\.replace\.device", "bad device 'tpu'")


def test_yaml_text_that_is_no_path():
    message = error_of("x" * 5000)  # neither a file (the OS refuses the name) nor a built-in name
    assert message.startswith("'xxxxxxxx") and "is not a rule file, a built-in rule name or YAML text" in message
    assert len(message) < 400


def test_readme_lists_the_limits():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Rule files") : readme.index("## Operators")]
    for text in (
        f"| {limits.MAX_FILE_BYTES >> 20} MiB / {limits.MAX_TOTAL_BYTES >> 20} MiB |",
        f"| {limits.MAX_FILES} / {limits.MAX_INCLUDE_DEPTH} deep |",
        f"| {limits.MAX_NAME_CHARS} characters |",
        f"| {limits.MAX_DEPTH} levels |",
        f"| {limits.MAX_NODES:,} |",
        f"| {limits.MAX_NUMBER_CHARS} characters |",
        f"| {limits.MAX_RULES:,} |",
        f"| {limits.MAX_REGEX_CHARS} characters |",
        f"| {limits.MAX_VARIABLE_NODES:,} |",
        f"| {limits.MAX_INTERPOLATED_CHARS} characters |",
        f"counts {limits.INTERPOLATION_COST}) | {limits.MAX_INTERPOLATION_WORK:,} characters |",
        f"| {limits.MAX_REFERENCE_DEPTH} deep |",
    ):
        assert text in section, text


@pytest.mark.parametrize("parser", ["SafeLoader", "CSafeLoader"])
def test_pure_python_and_libyaml_parsers_agree(tmp_path, monkeypatch, parser):
    import yaml

    if not hasattr(yaml, parser):
        pytest.skip("PyYAML was built without libyaml")
    monkeypatch.setattr("ktinject.rules.yaml_reader._PARSER", getattr(yaml, parser))
    expect(write(tmp_path, "vars:\n  deep: " + "[" * 500 + "]" * 500 + "\n" + GOOD), 2, "<yaml>", "nested more than")
    expect(
        write(
            tmp_path, "rules:\n  - match: {name: x}\n    replace: {op: keep, device: cpu}\n   bad: indent\n", "s.yaml"
        ),
        4,
        "<yaml>",
        r"\(while parsing a block collection on line 2\)$",
    )
    expect(
        write(tmp_path, "rules: 'x\nb: c\n", "q.yaml"),
        3,
        "<yaml>",
        r"end of stream \(while scanning a quoted scalar on line 1\)",
    )
    expect(
        write(tmp_path, "vars: {a: &a [x, x], b: &b [*a, *a], c: [*b, *zz]}\n" + GOOD, "a.yaml"),
        1,
        "<yaml>",
        r"alias \*zz has no anchor",
    )
    assert (
        len(
            ktinject.load_rules(
                write(tmp_path, GOOD + "  - match: {name: y}\n    replace: {op: keep, device: meta}\n", "g.yaml")
            )
        )
        == 2
    )
