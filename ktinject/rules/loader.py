"""Read rule files: YAML (safe, bounded) with line numbers, ``include``, ``vars`` interpolation, full validation.

File format (see docs/ARCHITECTURE.md and the README)::

    include: [base/moe.yaml]          # relative to this file, or a built-in name
    vars: {gpu: 'cuda:0'}             # ${vars.gpu} anywhere in a rule's strings (OmegaConf)
    rules:                            # or: the whole file is a plain list of rules
      - name: experts-on-cpu
        match: {name: '\\.mlp\\.experts$', class: Qwen3MoeExperts}
        replace: {op: cpu_experts, device: cpu, kwargs: {weight_type: q4_k}}
        recursive: false

Order: a file's own rules come before the rules of the files it includes (first match wins), includes in
the order listed, each file's rules once even if included twice. Variables: included files give
defaults, the including file overrides them, and the caller's ``vars=`` override everything (only
variables some file declares); interpolation runs after all files are read, so a family file can change
a value a shared base file uses.

Every mistake raises ``RuleError("file:line: key.path: what is wrong")`` on one line, and the work is
bounded for any input (see ``limits``).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Mapping
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import torch

from ktinject.devices import AUTO_DEVICE, auto_device
from ktinject.errors import OperatorError
from ktinject.messages import exception_text, show
from ktinject.operator import resolve_operator, validate_config
from ktinject.rules.builtin import builtin_rule_path
from ktinject.rules.kinds import KINDS, ModuleKind, module_kind
from ktinject.rules.known_classes import is_known_class_name, known_class_names
from ktinject.rules.limits import (
    MAX_FILE_BYTES,
    MAX_FILES,
    MAX_INCLUDE_DEPTH,
    MAX_NAME_CHARS,
    MAX_REGEX_CHARS,
    MAX_RULES,
    MAX_TOTAL_BYTES,
)
from ktinject.rules.schema import Match, Replace, Rule, RuleSet, SourceLocation
from ktinject.rules.variables import Declaration, Variables, check_name
from ktinject.rules.yaml_reader import Document, KeyPath, read_document, rule_error

_TOP_KEYS = ("include", "vars", "rules")
_RULE_KEYS = ("name", "match", "replace", "recursive")
_MATCH_KEYS = ("name", "class", "kind")
_REPLACE_KEYS = ("op", "device", "kwargs")


def _unknown_key_message(key: Any, allowed: tuple[str, ...]) -> str:
    hint = get_close_matches(key, allowed, n=1) if isinstance(key, str) and len(key) <= 64 else []
    return f"unknown key {show(key)} (allowed: {', '.join(allowed)})" + (f"; did you mean {hint[0]!r}?" if hint else "")


@dataclasses.dataclass
class _RawRule:
    """A rule before interpolation and validation, with the document it came from."""

    doc: Document
    path: KeyPath
    data: dict


@dataclasses.dataclass
class _LoadState:
    rules: list[_RawRule] = dataclasses.field(default_factory=list)
    files: list[str] = dataclasses.field(default_factory=list)
    loaded: set[str] = dataclasses.field(default_factory=set)  # resolved paths already read (diamond includes)
    bytes_read: int = 0


def _include_name(name: Any, doc: Document, path: KeyPath) -> str:
    if not isinstance(name, str) or not name.strip():
        raise doc.error(path, f"an include must be a file name or built-in rule name, got {show(name)}")
    if len(name) > MAX_NAME_CHARS:
        raise doc.error(path, f"include name of {len(name):,} characters (at most {MAX_NAME_CHARS:,})")
    if not name.isprintable():
        raise doc.error(path, f"include name {show(name)} holds control characters")
    return name


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name the OS refuses (too long for it, ...) names no file
        return False


def _resolve_include(name: Any, including: Path | None, doc: Document, path: KeyPath) -> Path:
    name = _include_name(name, doc, path)
    candidate = including.parent / name if including is not None else Path(name)
    if _is_file(candidate):
        try:
            return candidate.resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise doc.error(path, f"cannot resolve included file {show(name)}: {exception_text(exc)}") from None
    builtin = builtin_rule_path(name)
    if builtin is not None:
        return builtin
    where = (
        f" (looked in {including.parent} and the built-in rules)"
        if including
        else " (looked in the working directory and the built-in rules)"
    )
    raise doc.error(path, f"included file {show(name)} not found{where}")


def _optional(data: dict, key: str, default: Any) -> Any:
    value = data.get(key)
    return default if value is None else value


def _collect(doc: Document, file_path: Path | None, state: _LoadState, stack: list[str]) -> dict[str, Declaration]:
    """Read one document: its own rules first, then its includes (depth first).

    Returns the document's variables: those of its includes (later includes win), overridden by its own.
    """
    data = doc.data
    if data is None:
        data = {}
    if isinstance(data, list):
        data = {"rules": data}
        doc.lines = {("rules",) + k: v for k, v in doc.lines.items()}
    if not isinstance(data, dict):
        raise doc.error(
            (),
            f"a rule file must be a mapping with {', '.join(_TOP_KEYS)} or a list of rules, got {type(data).__name__}",
        )
    for key in data:
        if key not in _TOP_KEYS:
            raise doc.error((key,), _unknown_key_message(key, _TOP_KEYS))

    includes = _optional(data, "include", [])
    if isinstance(includes, str):
        includes = [includes]
        doc.lines[("include", 0)] = doc.line(("include",))
    if not isinstance(includes, list):
        raise doc.error(("include",), f"include must be a file name or a list of them, got {type(includes).__name__}")

    file_vars = _optional(data, "vars", {})
    if not isinstance(file_vars, dict):
        raise doc.error(("vars",), f"vars must be a mapping of names to values, got {type(file_vars).__name__}")
    own_vars = {
        check_name(name, doc, ("vars", name)): Declaration(value, doc, ("vars", name))
        for name, value in file_vars.items()
    }

    rules = _optional(data, "rules", [])
    if not isinstance(rules, list):
        raise doc.error(("rules",), f"rules must be a list, got {type(rules).__name__}")
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict):
            raise doc.error(
                ("rules", i), f"a rule must be a mapping with keys {', '.join(_RULE_KEYS)}, got {type(rule).__name__}"
            )
        if len(state.rules) >= MAX_RULES:
            raise doc.error(("rules", i), f"more than {MAX_RULES:,} rules in this rule set")
        state.rules.append(_RawRule(doc=doc, path=("rules", i), data=rule))

    merged_vars: dict[str, Declaration] = {}
    for i, name in enumerate(includes):
        target = _resolve_include(name, file_path, doc, ("include", i))
        key = str(target)
        if key in stack:
            chain = " -> ".join([*stack[stack.index(key) :], key])
            raise doc.error(("include", i), f"include cycle: {chain}")
        if key in state.loaded:
            continue
        if len(stack) >= MAX_INCLUDE_DEPTH:
            raise doc.error(("include", i), f"includes nested more than {MAX_INCLUDE_DEPTH} files deep")
        if len(state.files) >= MAX_FILES:
            raise doc.error(("include", i), f"more than {MAX_FILES} files in this rule set")
        state.loaded.add(key)
        state.files.append(key)
        child = _read_file(target, state)
        merged_vars.update(_collect(child, target, state, [*stack, key]))
    merged_vars.update(own_vars)
    return merged_vars


def _read_file(path: Path, state: _LoadState) -> Document:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)  # a longer file is refused without reading it all
    except (OSError, ValueError) as exc:
        raise rule_error(
            str(path), 1, "<file>", f"cannot read rule file: {getattr(exc, 'strerror', None) or exception_text(exc)}"
        ) from None
    state.bytes_read += len(data)
    if state.bytes_read > MAX_TOTAL_BYTES:
        raise rule_error(
            str(path), 1, "<file>", f"the files of this rule set hold more than {MAX_TOTAL_BYTES:,} bytes together"
        )
    return read_document(data, str(path))


_DEVICE_RE = re.compile(r"^(cpu|meta|cuda|xpu|mps|hpu|npu)(:\d{1,6})?$")


def _parse_device(value: Any, doc: Document, path: KeyPath) -> torch.device:
    if isinstance(value, str) and value.strip() == AUTO_DEVICE:
        return auto_device()
    if not isinstance(value, str) or not _DEVICE_RE.match(value.strip()):
        raise doc.error(
            path, f"bad device {show(value)} (expected 'auto', 'cpu', 'cuda', 'cuda:N', 'xpu:N', 'mps' or 'meta')"
        )
    try:
        return torch.device(value.strip())
    except (RuntimeError, ValueError) as exc:
        raise doc.error(path, f"bad device {show(value)}: {exception_text(exc)}") from None


def _is_dotted_path(spec: str) -> bool:
    parts = spec.split(".")
    return len(parts) >= 2 and all(part.isidentifier() for part in parts)


def _resolve_class(spec: str, doc: Document, path: KeyPath) -> tuple[str | None, type | None]:
    if "." in spec:
        if not _is_dotted_path(spec):
            raise doc.error(
                path, f"{show(spec)} is neither a class name nor a dotted path such as 'mypkg.modeling.MyExperts'"
            )
        module_path, _, attr = spec.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module_path), attr)
        except (ImportError, AttributeError) as exc:
            raise doc.error(path, f"cannot import class {show(spec)}: {exception_text(exc)}") from None
        except (Exception, SystemExit) as exc:  # the named module's own code failed (or exited) while importing
            raise doc.error(
                path,
                f"importing {module_path!r} for class {show(spec)} failed: {type(exc).__name__}: {exception_text(exc)}",
            ) from None
        if not isinstance(obj, type):
            raise doc.error(path, f"{show(spec)} is not a class")
        return None, obj
    if not spec.isidentifier():
        raise doc.error(
            path, f"{show(spec)} is neither a class name nor a dotted path such as 'mypkg.modeling.MyExperts'"
        )
    if not is_known_class_name(spec):
        hint = get_close_matches(spec, known_class_names(), n=1) if len(spec) <= 128 else []
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        raise doc.error(
            path,
            f"unknown class {show(spec)}: not a transformers model class, torch.nn module or ktinject operator{suggestion} "
            "(use a dotted path such as 'mypkg.modeling.MyExperts' for classes defined elsewhere)",
        )
    return spec, None


def _resolve_kind(value: Any, doc: Document, path: KeyPath) -> ModuleKind:
    kind = module_kind(value) if isinstance(value, str) else None
    if kind is None:
        hint = get_close_matches(value, KINDS, n=1) if isinstance(value, str) and len(value) <= 64 else []
        raise doc.error(
            path,
            f"unknown kind {show(value)} (known: {', '.join(KINDS)})"
            + (f"; did you mean {hint[0]!r}?" if hint else ""),
        )
    return kind


def _resolve_op(op: str, doc: Document, path: KeyPath):
    if len(op) > 256 or ("." in op and not _is_dotted_path(op)):
        raise doc.error(path, f"{show(op)} is neither an operator name nor a dotted path such as 'mypkg.ops.MyExperts'")
    try:
        return resolve_operator(op)
    except OperatorError as exc:
        raise doc.error(path, exception_text(exc, 1000)) from None
    except (Exception, SystemExit) as exc:  # the named module's own code failed (or exited) while importing
        raise doc.error(
            path, f"importing operator {show(op)} failed: {type(exc).__name__}: {exception_text(exc)}"
        ) from None


def _compile_regex(regex: Any, doc: Document, path: KeyPath) -> re.Pattern[str]:
    if not isinstance(regex, str):
        raise doc.error(path, f"match.name must be a regex string, got {show(regex)}")
    if len(regex) > MAX_REGEX_CHARS:
        raise doc.error(path, f"a regex of {len(regex):,} characters (at most {MAX_REGEX_CHARS:,})")
    try:
        return re.compile(regex)
    except re.error as exc:
        raise doc.error(path, f"bad regex {show(regex)}: {exc}") from None
    except (RecursionError, OverflowError, ValueError) as exc:  # groups nested thousands deep, huge repeat counts
        raise doc.error(path, f"bad regex {show(regex)}: {type(exc).__name__}: {exception_text(exc)}") from None


def _build_rule(raw: _RawRule, index: int, variables: Variables) -> Rule:
    doc, base, data = raw.doc, raw.path, raw.data
    for key in data:
        if key not in _RULE_KEYS:
            raise doc.error(base + (key,), _unknown_key_message(key, _RULE_KEYS))

    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise doc.error(base + ("name",), f"name must be a string, got {show(name)}")

    match_data = data.get("match")
    if not isinstance(match_data, dict) or not match_data:
        raise doc.error(
            base + ("match",), "every rule needs a match mapping with 'name' (regex), 'class' and/or 'kind'"
        )
    for key in match_data:
        if key not in _MATCH_KEYS:
            raise doc.error(base + ("match", key), _unknown_key_message(key, _MATCH_KEYS))
    match_data = variables.interpolate(match_data, doc, base + ("match",))
    pattern = _compile_regex(match_data["name"], doc, base + ("match", "name")) if "name" in match_data else None
    class_name = class_type = None
    if "class" in match_data:
        cls = match_data["class"]
        if not isinstance(cls, str) or not cls:
            raise doc.error(
                base + ("match", "class"), f"match.class must be a class name or dotted path, got {show(cls)}"
            )
        class_name, class_type = _resolve_class(cls, doc, base + ("match", "class"))
    kind = _resolve_kind(match_data["kind"], doc, base + ("match", "kind")) if "kind" in match_data else None

    replace_data = data.get("replace")
    if not isinstance(replace_data, dict):
        raise doc.error(base + ("replace",), "every rule needs a replace mapping with 'op' and 'device'")
    for key in replace_data:
        if key not in _REPLACE_KEYS:
            raise doc.error(base + ("replace", key), _unknown_key_message(key, _REPLACE_KEYS))
    replace_data = variables.interpolate(replace_data, doc, base + ("replace",))
    for required in ("op", "device"):
        if required not in replace_data:
            raise doc.error(base + ("replace",), f"replace.{required} is required")
    op = replace_data["op"]
    if not isinstance(op, str) or not op:
        raise doc.error(base + ("replace", "op"), f"op must be an operator name or dotted path, got {show(op)}")
    op_class = _resolve_op(op, doc, base + ("replace", "op"))
    device = _parse_device(replace_data["device"], doc, base + ("replace", "device"))
    kwargs = _optional(replace_data, "kwargs", {})
    if not isinstance(kwargs, dict):
        raise doc.error(base + ("replace", "kwargs"), f"kwargs must be a mapping, got {show(kwargs)}")
    try:
        config = validate_config(op_class, kwargs)
    except OperatorError as exc:
        key = getattr(exc, "key", None)
        raise doc.error(
            base + ("replace", "kwargs") + ((key,) if key is not None else ()), exception_text(exc, 1000)
        ) from None

    recursive = data.get("recursive", True)
    if not isinstance(recursive, bool):
        raise doc.error(base + ("recursive",), f"recursive must be true or false, got {show(recursive)}")

    return Rule(
        match=Match(name=pattern, class_name=class_name, class_type=class_type, kind=kind),
        replace=Replace(op=op, op_class=op_class, device=device, kwargs=dict(kwargs), config=config),
        recursive=recursive,
        index=index,
        location=SourceLocation(doc.file, doc.line(base)),
        name=name,
    )


def _build_ruleset(doc: Document, base_path: Path | None, vars: Mapping[str, Any] | None, state: _LoadState) -> RuleSet:
    state.files.insert(0, doc.file)
    stack: list[str] = []
    if base_path is not None:
        state.loaded.add(str(base_path))
        stack.append(str(base_path))
    variables = Variables(_collect(doc, base_path, state, stack), vars, doc.file)
    rules = tuple(_build_rule(raw, i, variables) for i, raw in enumerate(state.rules))
    return RuleSet(rules=rules, vars=variables.values, files=tuple(state.files))


def parse_rules(text: str, *, file: str = "<string>", vars: Mapping[str, Any] | None = None) -> RuleSet:
    """Build a RuleSet from YAML text (includes resolve against the working directory and built-in rules)."""
    state = _LoadState()
    return _build_ruleset(read_document(text, file), None, vars, state)


def load_rule_file(path: str | Path, *, vars: Mapping[str, Any] | None = None) -> RuleSet:
    """Read a rule file from disk (includes resolve relative to it, then against the built-in rules)."""
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise rule_error(str(path), 1, "<file>", f"cannot read rule file: {exception_text(exc)}") from None
    state = _LoadState()
    return _build_ruleset(_read_file(resolved, state), resolved, vars, state)
