"""Read rule files: YAML (safe) with line numbers, ``include``, ``vars`` interpolation, full validation.

File format (see DESIGN.md and the README)::

    include: [base/moe.yaml]          # relative to this file, or a built-in name
    vars: {gpu: 'cuda:0'}             # ${vars.gpu} anywhere in a rule's strings (OmegaConf)
    rules:                            # or: the whole file is a plain list of rules
      - name: experts-on-cpu
        match: {name: '\\.mlp\\.experts$', class: Qwen3MoeExperts}
        replace: {op: cpu_experts, device: cpu, kwargs: {weight_type: q4_k}}
        recursive: false

Order: a file's own rules come before the rules of the files it includes (first match wins), includes in
the order listed, each file's rules once even if included twice. Variables: included files give
defaults, the including file overrides them, and the caller's ``vars=`` override everything; interpolation
runs after all files are read, so a family file can change a value a shared base file uses.

Every mistake raises ``RuleError("file:line: key.path: what is wrong")``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import torch
import yaml

from ktinject.errors import OperatorError, RuleError
from ktinject.operator import resolve_operator, validate_config
from ktinject.rules.builtin import builtin_rule_path
from ktinject.rules.known_classes import is_known_class_name, known_class_names
from ktinject.rules.schema import Match, Replace, Rule, RuleSet, SourceLocation

_TOP_KEYS = ("include", "vars", "rules")
_RULE_KEYS = ("name", "match", "replace", "recursive")
_MATCH_KEYS = ("name", "class")
_REPLACE_KEYS = ("op", "device", "kwargs")

Path_ = tuple[Any, ...]  # a key path inside one document: ("rules", 0, "replace", "op")


@dataclasses.dataclass
class _Document:
    """One parsed YAML file: its data plus the line of every key path."""

    file: str
    data: Any
    lines: dict[Path_, int]

    def line(self, path: Path_) -> int:
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path, 1)

    def error(self, path: Path_, message: str) -> RuleError:
        return RuleError(f"{self.file}:{self.line(path)}: {_format_path(path)}: {message}")


def _format_path(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top>"


def _unknown_key_message(key: Any, allowed: tuple[str, ...]) -> str:
    hint = get_close_matches(str(key), allowed, n=1)
    return f"unknown key {key!r} (allowed: {', '.join(allowed)})" + (f"; did you mean {hint[0]!r}?" if hint else "")


def _record_lines(node: yaml.Node, path: Path_, lines: dict[Path_, int], file: str) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise RuleError(f"{file}:{key_node.start_mark.line + 1}: {_format_path(path + (key,))}: duplicate key {key!r}")
            seen.add(key)
            lines[path + (key,)] = key_node.start_mark.line + 1
            _record_lines(value_node, path + (key,), lines, file)
            lines[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record_lines(item, path + (i,), lines, file)


def _parse_yaml(text: str, file: str) -> _Document:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "invalid YAML"
        raise RuleError(f"{file}:{line}: <yaml>: {problem} (rule files are plain YAML; Python tags are not allowed)") from None
    except yaml.YAMLError as exc:
        raise RuleError(f"{file}:1: <yaml>: {exc}") from None
    lines: dict[Path_, int] = {}
    if node is not None:
        _record_lines(node, (), lines, file)
    return _Document(file=file, data=data, lines=lines)


@dataclasses.dataclass
class _RawRule:
    """A rule before interpolation and validation, with the document it came from."""

    doc: _Document
    path: Path_
    data: dict


@dataclasses.dataclass
class _LoadState:
    rules: list[_RawRule] = dataclasses.field(default_factory=list)
    files: list[str] = dataclasses.field(default_factory=list)
    loaded: set[str] = dataclasses.field(default_factory=set)  # resolved paths already read (diamond includes)


def _resolve_include(name: Any, including: Path | None, doc: _Document, path: Path_) -> Path:
    if not isinstance(name, str) or not name.strip():
        raise doc.error(path, f"an include must be a file name or built-in rule name, got {name!r}")
    candidates = []
    if including is not None:
        candidates.append(including.parent / name)
    else:
        candidates.append(Path(name))
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    builtin = builtin_rule_path(name)
    if builtin is not None:
        return builtin.resolve()
    where = f" (looked in {including.parent} and the built-in rules)" if including else " (looked in the working directory and the built-in rules)"
    raise doc.error(path, f"included file {name!r} not found{where}")


def _collect(doc: _Document, file_path: Path | None, state: _LoadState, stack: list[str]) -> dict:
    """Read one document: its own rules first, then its includes (depth first).

    Returns the document's variables: those of its includes (later includes win), overridden by its own.
    """
    data = doc.data
    if data is None:
        data = {}
    if isinstance(data, list):
        data = {"rules": data}
        doc.lines = {("rules",) + k if k else ("rules",): v for k, v in doc.lines.items()}
    if not isinstance(data, dict):
        raise doc.error((), f"a rule file must be a mapping with {', '.join(_TOP_KEYS)} or a list of rules, got {type(data).__name__}")
    for key in data:
        if key not in _TOP_KEYS:
            raise doc.error((key,), _unknown_key_message(key, _TOP_KEYS))

    includes = data.get("include") or []
    if isinstance(includes, str):
        includes = [includes]
        doc.lines[("include", 0)] = doc.line(("include",))
    if not isinstance(includes, list):
        raise doc.error(("include",), f"include must be a file name or a list of them, got {type(includes).__name__}")

    file_vars = data.get("vars") or {}
    if not isinstance(file_vars, dict):
        raise doc.error(("vars",), f"vars must be a mapping of names to values, got {type(file_vars).__name__}")

    rules = data.get("rules") or []
    if not isinstance(rules, list):
        raise doc.error(("rules",), f"rules must be a list, got {type(rules).__name__}")
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict):
            raise doc.error(("rules", i), f"a rule must be a mapping with keys {', '.join(_RULE_KEYS)}, got {type(rule).__name__}")
        state.rules.append(_RawRule(doc=doc, path=("rules", i), data=rule))

    merged_vars: dict = {}
    for i, name in enumerate(includes):
        target = _resolve_include(name, file_path, doc, ("include", i))
        key = str(target)
        if key in stack:
            chain = " -> ".join([*stack[stack.index(key):], key])
            raise doc.error(("include", i), f"include cycle: {chain}")
        if key in state.loaded:
            continue
        state.loaded.add(key)
        state.files.append(key)
        child = _read_file(target)
        merged_vars.update(_collect(child, target, state, [*stack, key]))
    merged_vars.update(file_vars)
    return merged_vars


def _read_file(path: Path) -> _Document:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleError(f"{path}:1: <file>: cannot read rule file: {exc.strerror or exc}") from None
    return _parse_yaml(text, str(path))


class _Interpolator:
    """Resolves ``${...}`` in strings with OmegaConf against the merged variables."""

    def __init__(self, variables: dict) -> None:
        self._vars = variables

    def __call__(self, value: Any, doc: _Document, path: Path_) -> Any:
        if isinstance(value, dict):
            return {k: self(v, doc, path + (k,)) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v, doc, path + (i,)) for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        try:
            conf = OmegaConf.create({"vars": self._vars, "__value__": value})
            return OmegaConf.to_container(conf, resolve=True)["__value__"]
        except OmegaConfBaseException as exc:
            message = str(exc).splitlines()[0]
            raise doc.error(path, f"cannot resolve {value!r}: {message} (variables: {', '.join(sorted(self._vars)) or 'none'})") from None


_DEVICE_RE = re.compile(r"^(cpu|meta|cuda|xpu|mps|hpu|npu)(:\d+)?$")


def _parse_device(value: Any, doc: _Document, path: Path_) -> torch.device:
    if not isinstance(value, str) or not _DEVICE_RE.match(value.strip()):
        raise doc.error(path, f"bad device {value!r} (expected 'cpu', 'cuda', 'cuda:N', 'xpu:N', 'mps' or 'meta')")
    try:
        return torch.device(value.strip())
    except (RuntimeError, ValueError) as exc:
        raise doc.error(path, f"bad device {value!r}: {exc}") from None


def _resolve_class(spec: str, doc: _Document, path: Path_) -> tuple[str | None, type | None]:
    if "." in spec:
        import importlib

        module_path, _, attr = spec.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module_path), attr)
        except (ImportError, AttributeError) as exc:
            raise doc.error(path, f"cannot import class {spec!r}: {exc}") from None
        if not isinstance(obj, type):
            raise doc.error(path, f"{spec!r} is not a class")
        return None, obj
    if not is_known_class_name(spec):
        hint = get_close_matches(spec, known_class_names(), n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        raise doc.error(
            path,
            f"unknown class {spec!r}: not a transformers model class, torch.nn module or ktinject operator{suggestion} "
            "(use a dotted path such as 'mypkg.modeling.MyExperts' for classes defined elsewhere)",
        )
    return spec, None


def _build_rule(raw: _RawRule, index: int, interpolate: _Interpolator) -> Rule:
    doc, base, data = raw.doc, raw.path, raw.data
    for key in data:
        if key not in _RULE_KEYS:
            raise doc.error(base + (key,), _unknown_key_message(key, _RULE_KEYS))

    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise doc.error(base + ("name",), f"name must be a string, got {name!r}")

    match_data = data.get("match")
    if not isinstance(match_data, dict) or not match_data:
        raise doc.error(base + ("match",), "every rule needs a match mapping with 'name' (regex) and/or 'class'")
    for key in match_data:
        if key not in _MATCH_KEYS:
            raise doc.error(base + ("match", key), _unknown_key_message(key, _MATCH_KEYS))
    match_data = interpolate(match_data, doc, base + ("match",))
    pattern = None
    if "name" in match_data:
        regex = match_data["name"]
        if not isinstance(regex, str):
            raise doc.error(base + ("match", "name"), f"match.name must be a regex string, got {regex!r}")
        try:
            pattern = re.compile(regex)
        except re.error as exc:
            raise doc.error(base + ("match", "name"), f"bad regex {regex!r}: {exc}") from None
    class_name = class_type = None
    if "class" in match_data:
        cls = match_data["class"]
        if not isinstance(cls, str) or not cls:
            raise doc.error(base + ("match", "class"), f"match.class must be a class name or dotted path, got {cls!r}")
        class_name, class_type = _resolve_class(cls, doc, base + ("match", "class"))

    replace_data = data.get("replace")
    if not isinstance(replace_data, dict):
        raise doc.error(base + ("replace",), "every rule needs a replace mapping with 'op' and 'device'")
    for key in replace_data:
        if key not in _REPLACE_KEYS:
            raise doc.error(base + ("replace", key), _unknown_key_message(key, _REPLACE_KEYS))
    replace_data = interpolate(replace_data, doc, base + ("replace",))
    for required in ("op", "device"):
        if required not in replace_data:
            raise doc.error(base + ("replace",), f"replace.{required} is required")
    op = replace_data["op"]
    if not isinstance(op, str) or not op:
        raise doc.error(base + ("replace", "op"), f"op must be an operator name or dotted path, got {op!r}")
    try:
        op_class = resolve_operator(op)
    except OperatorError as exc:
        raise doc.error(base + ("replace", "op"), str(exc)) from None
    device = _parse_device(replace_data["device"], doc, base + ("replace", "device"))
    kwargs = replace_data.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise doc.error(base + ("replace", "kwargs"), f"kwargs must be a mapping, got {kwargs!r}")
    try:
        config = validate_config(op_class, kwargs)
    except OperatorError as exc:
        key = getattr(exc, "key", None)
        raise doc.error(base + ("replace", "kwargs") + ((key,) if key else ()), str(exc)) from None

    recursive = data.get("recursive", True)
    if not isinstance(recursive, bool):
        raise doc.error(base + ("recursive",), f"recursive must be true or false, got {recursive!r}")

    return Rule(
        match=Match(name=pattern, class_name=class_name, class_type=class_type),
        replace=Replace(op=op, op_class=op_class, device=device, kwargs=dict(kwargs), config=config),
        recursive=recursive,
        index=index,
        location=SourceLocation(doc.file, doc.line(base)),
        name=name,
    )


def _build_ruleset(doc: _Document, base_path: Path | None, vars: Mapping[str, Any] | None) -> RuleSet:
    state = _LoadState(files=[doc.file])
    stack: list[str] = []
    if base_path is not None:
        state.loaded.add(str(base_path))
        stack.append(str(base_path))
    variables = _collect(doc, base_path, state, stack)
    variables.update(vars or {})
    interpolate = _Interpolator(variables)
    rules = tuple(_build_rule(raw, i, interpolate) for i, raw in enumerate(state.rules))
    return RuleSet(rules=rules, vars=variables, files=tuple(state.files))


def parse_rules(text: str, *, file: str = "<string>", vars: Mapping[str, Any] | None = None) -> RuleSet:
    """Build a RuleSet from YAML text (includes resolve against the working directory and built-in rules)."""
    return _build_ruleset(_parse_yaml(text, file), None, vars)


def load_rule_file(path: str | Path, *, vars: Mapping[str, Any] | None = None) -> RuleSet:
    """Read a rule file from disk (includes resolve relative to it, then against the built-in rules)."""
    resolved = Path(path).resolve()
    return _build_ruleset(_read_file(resolved), resolved, vars)
