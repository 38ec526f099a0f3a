"""Seeded fuzzing of rule loading: mutated rule files either load or raise a one-line RuleError at file:line.

Seeds are the shipped rule files, the README's example and a file using every key, operator and kwarg.
Mutations: lines deleted, duplicated, swapped, re-indented; characters flipped; YAML syntax, anchors,
aliases, alias bombs, tags, deep nesting, huge strings and invalid UTF-8 inserted; every key's value
replaced by values of random types; and token soup (rule words and YAML syntax in random order). Any exception other than RuleError, a message on more than one line,
or a message that does not start with ``file:line:`` of a file of the rule set fails.

``KTINJECT_FUZZ_SEED`` / ``KTINJECT_FUZZ_CASES`` run other or more cases (the default fits CI in seconds).
"""

from __future__ import annotations

import datetime
import os
import random
import re
import shutil
from pathlib import Path

import pytest
import yaml

import ktinject
from ktinject import RuleError
from ktinject.rules.builtin import builtin_rules_dir

SEED = int(os.environ.get("KTINJECT_FUZZ_SEED", "20240611"))
TEXT_CASES = int(os.environ.get("KTINJECT_FUZZ_CASES", "1000"))
VALUES_PER_KEY = 2
SOUP_CASES = TEXT_CASES
REPO = Path(__file__).resolve().parents[2]

EVERY_KEY = r"""
include: [base/placement.yaml]
vars:
  gpu: cpu
  dtype: float32
  threads: 1
  common: &common {weight_type: q8_0, isa: auto}
rules:
  - name: experts
    match: {name: '^model\.layers\.\d+\.mlp\.experts$', class: Qwen3MoeExperts}
    replace:
      op: cpu_experts
      device: cpu
      kwargs: {<<: *common, threads: '${vars.threads}', numa_nodes: 1}
    recursive: false
  - name: reference-experts
    match: {class: torch.nn.Module, name: 'experts$'}
    replace: {op: torch_experts, device: '${vars.gpu}', kwargs: {dtype: '${vars.dtype}'}}
  - name: marlin
    match: {name: 'up_proj$', class: Linear}
    replace: {op: marlin_linear, device: 'cuda:0', kwargs: {group_size: 128, bits: 4, dtype: auto, backend: auto, checkpoint: dense}}
  - name: dotted
    match: {name: 'proj$'}
    replace: {op: ktinject.operators.torch_linear.TorchLinear, device: meta, kwargs: {dtype: bfloat16}}
  - &kept {match: {name: '^lm_head$'}, replace: {op: keep, device: '${vars.gpu}'}}
  - *kept
"""

SNIPPETS = [
    ": ",
    "- ",
    "{",
    "}",
    "[",
    "]",
    ",",
    "&a ",
    "*a",
    "*zz",
    "&a [*a] ",
    "!!python/object/apply:os.system ['true'] ",
    "!!python/name:os.system ",
    "!!binary ",
    "!!set ",
    "!!omap ",
    "!!int ",
    "!!float ",
    "!!bool ",
    "!!timestamp ",
    "!foo ",
    "!<tag:x> ",
    "<<: *a\n",
    "<<: ",
    "? ",
    "%YAML 1.1\n",
    "%TAG ! tag:yaml.org,2002:python/\n",
    "---\n",
    "...\n",
    "# ",
    "'",
    '"',
    "\\",
    "\t",
    "|\n",
    ">-\n",
    "${vars.",
    "${vars.gpu}",
    "${vars.nope}",
    "${oc.env:HOME}",
    "${vars.${vars.gpu}}",
    "\x00",
    "\x07",
    "\x1b",
    "\u2028",
    "\x85",
    "\ufeff",
    "\ud7ff",
    "é",
    "😀",
    "=",
    "~",
    "null",
    "1e11",
    "0x7f",
    "1:30:00",
    ".nan",
    "-.inf",
    "99999999999999999999999",
    "2024-01-01",
    "@",
    "`",
    "%",
    "\r",
    "\r\n",
]

VALUES = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2,
    3,
    64,
    2**31,
    2**63,
    10**30,
    -(10**30),
    1.5,
    float("nan"),
    float("inf"),
    "1e11",
    "",
    "x",
    ".foo",
    "foo.",
    "a..b",
    "cpu",
    "cuda:0",
    "cuda:99999999999",
    "meta",
    "gpu0",
    "${vars.gpu}",
    "${vars.nope}",
    "${",
    "${vars.${vars.gpu}}",
    "keep",
    "cpu_experts",
    "marlin_linear",
    "torch.nn.Linear",
    "Linear",
    "no.such.Module",
    "(((",
    "^$",
    "x" * 5000,
    "\n\t",
    "é",
    [],
    [1, "a"],
    {},
    {"a": 1},
    {"op": "keep"},
    {"name": "x"},
    [[[[]]]],
    {1: 2},
    datetime.date(2020, 1, 1),
    b"\x00\xff",
    {"x", "y"},
    "base/moe.yaml",
    "qwen3_moe",
    "../" * 40 + "etc/passwd",
]


def _rules_copy(tmp_path: Path) -> Path:
    root = tmp_path / "rules"
    shutil.copytree(builtin_rules_dir(), root)
    return root


def _seeds() -> dict[str, str]:
    root = builtin_rules_dir()
    seeds = {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*.yaml"))}
    readme = (REPO / "README.md").read_text()
    start = readme.index("```yaml\n# my_rules.yaml") + len("```yaml\n")
    seeds["readme.yaml"] = readme[start : readme.index("```", start)]
    seeds["every_key.yaml"] = EVERY_KEY.lstrip("\n")
    return seeds


# ---- text mutations ------------------------------------------------------------------------------------------


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\n")


def _delete_line(rng, data):
    lines = _lines(data)
    del lines[rng.randrange(len(lines))]
    return b"\n".join(lines)


def _duplicate_line(rng, data):
    lines = _lines(data)
    i = rng.randrange(len(lines))
    lines.insert(i, lines[i])
    return b"\n".join(lines)


def _swap_lines(rng, data):
    lines = _lines(data)
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    lines[i], lines[j] = lines[j], lines[i]
    return b"\n".join(lines)


def _reindent(rng, data):
    lines = _lines(data)
    i = rng.randrange(len(lines))
    lines[i] = b" " * rng.randrange(0, 9) + lines[i].lstrip(b" ")
    return b"\n".join(lines)


def _flip_char(rng, data):
    if not data:
        return data
    i = rng.randrange(len(data))
    return data[:i] + rng.choice(b":{}[]&*!|>'\"#%@`-?,\\ \t\nx0.$").to_bytes(1, "big") + data[i + 1 :]


def _insert_snippet(rng, data):
    i = rng.randrange(len(data) + 1)
    return data[:i] + rng.choice(SNIPPETS).encode("utf-8", "surrogatepass") + data[i:]


def _truncate(rng, data):
    return data[: rng.randrange(len(data) + 1)]


def _alias_bomb(rng, data):
    width, depth = rng.randrange(2, 10), rng.randrange(3, 12)
    lines = [f"  b0: &b0 [{', '.join(['x'] * width)}]"]
    lines += [f"  b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * width)}]" for i in range(1, depth)]
    block = ("bomb:\n" if rng.random() < 0.5 else "vars:\n") + "\n".join(lines) + "\n"
    return block.encode() + data if rng.random() < 0.5 else data + b"\n" + block.encode()


def _deep_nesting(rng, data):
    depth = rng.choice([30, 63, 64, 65, 200, 1500])
    opening, closing = rng.choice([("[", "]"), ("{a: ", "}"), ("- ", "")])
    if opening == "- ":
        nested = "".join("\n" + "  " * k + "- " for k in range(min(depth, 300))) + "x"
    else:
        nested = opening * depth + "x" + closing * depth
    return _replace_a_value(rng, data, nested.encode())


def _huge_string(rng, data):
    size = rng.choice([1000, 70_000, 300_000])
    char = rng.choice(["a", "(", "${vars.gpu}", "é", "\\n"])
    return _replace_a_value(rng, data, ("'" + char * (size // len(char)) + "'").encode())


def _invalid_utf8(rng, data):
    i = rng.randrange(len(data) + 1)
    junk = bytes(rng.choice([0x80, 0xC0, 0xC3, 0xE2, 0xED, 0xF0, 0xF5, 0xFF, 0xFE]) for _ in range(rng.randrange(1, 4)))
    return data[:i] + junk + data[i:]


def _recursive_alias(rng, data):
    block = rng.choice([b"loop: &l [*l]\n", b"vars:\n  l: &l {a: *l}\n", b"rules: &r\n  - *r\n"])
    return block + data


def _interpolation_bomb(rng, data):
    levels = rng.randrange(5, 25)
    lines = ["  v0: xxxxxxxxxxxxxxxx"] + [f"  v{i}: '${{vars.v{i - 1}}}${{vars.v{i - 1}}}'" for i in range(1, levels)]
    rule = f"  - match: {{name: '${{vars.v{levels - 1}}}'}}\n    replace: {{op: keep, device: cpu}}\n"
    return ("vars:\n" + "\n".join(lines) + "\nrules:\n" + rule).encode() + (b"" if rng.random() < 0.5 else b"\n" + data)


def _replace_a_value(rng, data, value: bytes) -> bytes:
    """Put ``value`` after a random ``key:`` of the text (or append it as a new key)."""
    spots = [m.end() for m in re.finditer(rb"\w: ", data)]
    if not spots:
        return data + b"\nextra: " + value + b"\n"
    i = rng.choice(spots)
    end = data.find(b"\n", i)
    return data[:i] + value + (data[end:] if end >= 0 else b"")


TEXT_MUTATIONS = [
    _delete_line,
    _duplicate_line,
    _swap_lines,
    _reindent,
    _flip_char,
    _flip_char,
    _insert_snippet,
    _insert_snippet,
    _insert_snippet,
    _truncate,
    _alias_bomb,
    _deep_nesting,
    _huge_string,
    _invalid_utf8,
    _recursive_alias,
    _interpolation_bomb,
]


# ---- data mutations: every key's value replaced by values of random types ------------------------------------


def _key_paths(data, path=()):
    yield path
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _key_paths(v, path + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _key_paths(v, path + (i,))


def _with_value(data, path, value):
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(data, dict):
        return {k: (_with_value(v, rest, value) if k == head else v) for k, v in data.items()}
    return [(_with_value(v, rest, value) if i == head else v) for i, v in enumerate(data)]


def _data_cases(rng: random.Random, seeds: dict[str, str]):
    for name, text in seeds.items():
        data = yaml.safe_load(text)
        for path in [p for p in _key_paths(data) for _ in range(VALUES_PER_KEY)]:
            value = rng.choice(VALUES)
            mutated = yaml.safe_dump(_with_value(data, path, value), sort_keys=False, allow_unicode=rng.random() < 0.5)
            yield (
                name,
                f"{'.'.join(map(str, path)) or '<top>'} = {value!r:.60}",
                mutated.encode("utf-8", "surrogatepass"),
            )


def _text_cases(rng: random.Random, seeds: dict[str, str]):
    names = sorted(seeds)
    for _ in range(TEXT_CASES):
        name = rng.choice(names)
        data = seeds[name].encode()
        applied = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            mutation = rng.choice(TEXT_MUTATIONS)
            data = mutation(rng, data)
            applied.append(mutation.__name__.lstrip("_"))
        yield name, "+".join(applied), data


def _soup_cases(rng: random.Random, seeds: dict[str, str]):
    """Token soup: rule-file words, YAML syntax and odd characters in random order (hits the YAML layer hardest)."""
    words = SNIPPETS + [
        "rules",
        "vars",
        "include",
        "match",
        "replace",
        "op",
        "device",
        "kwargs",
        "name",
        "class",
        "recursive",
        "keep",
        "cpu",
        "cpu_experts",
        "threads",
        "\n",
        "\n  ",
        "\n    ",
        " ",
        "x",
        "a",
        "'${vars.a}'",
        "&b ",
        "*b",
        "torch.nn.Linear",
    ]
    for _ in range(SOUP_CASES):
        text = "".join(rng.choice(words) for _ in range(rng.randrange(1, 80)))
        yield "every_key.yaml", "soup", text.encode("utf-8", "surrogatepass")


# ---- the check ---------------------------------------------------------------------------------------------------

_YAML_BREAKS = re.compile(rb"\r\n|[\n\r]|\xc2\x85|\xe2\x80[\xa8\xa9]")  # YAML 1.1's line breaks (libyaml counts these)
_LOCATION = re.compile(r"^(?P<file>.+?):(?P<line>\d+): \S")  # the file: the fuzzed one or a file it includes


def _check_one(path: Path, data: bytes) -> str | None:
    """What went wrong, or "" when the file loaded, None when it raised a proper RuleError."""
    try:
        ktinject.load_rules(path)
        return ""
    except RuleError as exc:
        message = str(exc)
        if len(message.splitlines()) != 1:
            return f"message on several lines: {message!r:.300}"
        location = _LOCATION.match(message)
        if location is None or not Path(location["file"]).is_file():
            return f"message does not start with file:line of a rule file: {message!r:.300}"
        if location["file"] == str(path) and not 1 <= int(location["line"]) <= len(_YAML_BREAKS.split(data)) + 1:
            return f"line {location['line']} is outside the file: {message!r:.300}"
    except Exception as exc:  # the point of the test: nothing but RuleError may escape
        return f"{type(exc).__name__}: {exc!s:.300}"
    return None


@pytest.mark.parametrize("kind", ["text", "data", "soup"])
def test_mutated_rule_files_load_or_raise_one_line_rule_errors(tmp_path, kind):
    rng = random.Random(f"{SEED}-{kind}")
    seeds = _seeds()
    root = _rules_copy(tmp_path)
    cases = {"text": _text_cases, "data": _data_cases, "soup": _soup_cases}[kind](rng, seeds)
    failures, loaded, count = [], 0, 0
    for i, (seed_name, mutation, data) in enumerate(cases):
        path = (root / seed_name).with_name(f"fuzz_{i}.yaml")  # beside its seed, so relative includes resolve
        path.write_bytes(data)
        problem = _check_one(path, data)
        count += 1
        if problem == "":
            loaded += 1
        elif problem is not None:
            failures.append(f"case {i} ({seed_name}: {mutation}; seed {SEED}): {problem}")
        path.unlink()
    assert not failures, f"{len(failures)} of {count} cases failed:\n" + "\n".join(failures[:10])
    assert count >= {"text": TEXT_CASES, "data": 300, "soup": SOUP_CASES}[kind]
    assert loaded < count and (loaded > 0 or kind == "soup")  # mutations neither break every file nor leave all valid
