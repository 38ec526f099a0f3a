"""Rule-file variables (``vars:``) and the ``${vars.name}`` interpolation of rule strings, bounded.

Variables are declared by ``vars:`` mappings (included files give defaults, including files override
them); ``vars=`` / ``--set`` may override only declared ones, so a misspelt override is an error instead
of a setting that silently does nothing. Strings are resolved with OmegaConf.

Interpolation can multiply work: ``a: '${vars.b}${vars.b}'``, ``b: '${vars.c}${vars.c}'``... doubles the
text per level. Before OmegaConf resolves a string, its cost is estimated from the variables it names
(their text, recursively; each ``${`` counts ``INTERPOLATION_COST``), and a rule set may spend at most
``MAX_INTERPOLATION_WORK``; chains of variables naming variables are at most ``MAX_REFERENCE_DEPTH`` long.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from difflib import get_close_matches
from typing import Any

from ktinject.errors import RuleError
from ktinject.messages import exception_text, format_path, one_line, show
from ktinject.rules.limits import (
    INTERPOLATION_COST,
    MAX_DEPTH,
    MAX_INTERPOLATED_CHARS,
    MAX_INTERPOLATION_WORK,
    MAX_REFERENCE_DEPTH,
    MAX_VARIABLE_NODES,
)
from ktinject.rules.yaml_reader import Document, KeyPath

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,127}")
# ${vars.NAME}, ${vars['NAME']}, ${oc.select:vars.NAME,...}: the variables a string names.
_NAMED_REF = re.compile(r"\bvars\s*(?:\.\s*([A-Za-z0-9_-]+)|\[\s*['\"]?([A-Za-z0-9_-]+))")
# ${vars}, ${vars.${...}}, ${vars[${...}]}: the variable is only known when resolving; count them all.
_ANY_REF = re.compile(r"\bvars\s*(?:\}|\.\s*\$\{|\[\s*\$\{)")
_SCALARS = (str, int, float, bool, type(None))
_KEY_TYPES = (str, int, float, bool)
_NUMBER_COST = 24  # characters a number, boolean or null becomes at most
_INT64 = 1 << 63


@dataclasses.dataclass(frozen=True)
class Declaration:
    """A variable's value and where it was set (the file and key path of its last ``vars:`` entry)."""

    value: Any
    doc: Document
    path: KeyPath


def check_name(name: Any, doc: Document, path: KeyPath) -> str:
    """A variable name as written in ``${vars.NAME}``: letters, digits, ``_`` and ``-``."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise doc.error(
            path,
            f"variable name {show(name)} must be a string of letters, digits, '_' or '-' "
            "starting with a letter or '_' (at most 128 characters), as written in ${vars.NAME}",
        )
    return name


class Variables:
    """The merged variables of a rule set, and interpolation of rule values against them."""

    def __init__(self, declared: Mapping[str, Declaration], overrides: Mapping[str, Any] | None, top_file: str) -> None:
        self._declared = dict(declared)
        self.values: dict[str, Any] = {name: d.value for name, d in declared.items()}
        nodes = 0
        for name, declaration in declared.items():
            nodes = _check_value(declaration.value, nodes, lambda m, d=declaration: d.doc.error(d.path, m))
        for name, value in _override_items(overrides, top_file):
            if name not in self.values:
                raise RuleError(one_line(f"{top_file}: {format_path(('vars', name))}: {self._unknown_message(name)}"))
            nodes = _check_value(
                value,
                nodes,
                lambda m, n=name: RuleError(
                    one_line(f"{top_file}: {format_path(('vars', n))}: {m} (given by vars= / --set)")
                ),
            )
            self.values[name] = value
        self._conf: Any = None
        self._cache: dict[str, Any] = {}
        self._costs: dict[str, tuple[int, int]] = {}  # variable -> (cost, reference depth)
        self._all_cost: tuple[int, int] | None = None
        self._spent = 0

    def interpolate(self, value: Any, doc: Document, path: KeyPath) -> Any:
        """``value`` with every ``${...}`` in its strings resolved; a RuleError at ``path`` otherwise."""
        if isinstance(value, dict):
            return {k: self.interpolate(v, doc, path + (k,)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.interpolate(v, doc, path + (i,)) for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        if value not in self._cache:
            self._cache[value] = self._resolve(value, doc, path)
        return copy.deepcopy(self._cache[value])

    # ---- resolving ---------------------------------------------------------------------------------

    def _resolve(self, value: str, doc: Document, path: KeyPath) -> Any:
        if len(value) > MAX_INTERPOLATED_CHARS:
            raise doc.error(
                path,
                f"a string with ${{...}} may have at most {MAX_INTERPOLATED_CHARS:,} characters, "
                f"this one has {len(value):,}",
            )
        try:
            cost, _ = self._string_cost(value, ())
        except _TooDeep as exc:
            raise doc.error(
                path,
                f"cannot resolve {show(value)}: variables refer to variables more than "
                f"{MAX_REFERENCE_DEPTH} levels deep ({' -> '.join(exc.chain)})",
            ) from None
        self._spent += cost
        if self._spent > MAX_INTERPOLATION_WORK:
            raise doc.error(
                path,
                f"cannot resolve {show(value)}: interpolation would produce more than "
                f"{MAX_INTERPOLATION_WORK:,} characters in this rule set (each ${{...}} counts {INTERPOLATION_COST})",
            )
        from omegaconf import DictConfig, ListConfig, OmegaConf

        try:
            if self._conf is None:
                self._conf = OmegaConf.create({"vars": self.values})
            self._conf["__value__"] = value
            result = self._conf["__value__"]
            if isinstance(result, (DictConfig, ListConfig)):
                result = OmegaConf.to_container(result, resolve=True)
        except Exception as exc:  # OmegaConf's grammar and resolvers (user-registered ones too) raise many types
            names = sorted(self.values)
            listed = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
            raise doc.error(
                path, f"cannot resolve {show(value)}: {exception_text(exc)} (variables: {listed or 'none'})"
            ) from None
        return result

    def _string_cost(self, text: str, chain: tuple[str, ...]) -> tuple[int, int]:
        """(estimated characters resolving ``text`` produces, longest chain of variables it goes through)."""
        if "${" not in text:
            return len(text), 0
        cost, depth = len(text) + INTERPOLATION_COST * text.count("${"), 0
        for match in _NAMED_REF.finditer(text):
            c, d = self._variable_cost(match.group(1) or match.group(2), chain)
            cost, depth = cost + c, max(depth, d)
        if _ANY_REF.search(text):
            c, d = self._every_variable_cost(chain)
            cost, depth = cost + c, max(depth, d)
        return cost, depth

    def _variable_cost(self, name: str, chain: tuple[str, ...]) -> tuple[int, int]:
        if name not in self.values or name in chain:
            return 0, 0  # OmegaConf reports the missing key or the cycle when it resolves
        if name not in self._costs:
            if len(chain) >= MAX_REFERENCE_DEPTH:
                raise _TooDeep([*chain, name])
            cost, depth = self._value_cost(self.values[name], (*chain, name))
            self._costs[name] = (cost, depth + 1)
        cost, depth = self._costs[name]
        if len(chain) + depth > MAX_REFERENCE_DEPTH:
            raise _TooDeep([*chain, name, "..."])
        return cost, depth

    def _every_variable_cost(self, chain: tuple[str, ...]) -> tuple[int, int]:
        if self._all_cost is None:
            total = depth = 0
            for name in self.values:
                c, d = self._variable_cost(name, chain)
                total, depth = total + c, max(depth, d)
            self._all_cost = (total, depth)
        return self._all_cost

    def _value_cost(self, value: Any, chain: tuple[str, ...]) -> tuple[int, int]:
        cost = depth = 0
        pending = [value]
        while pending:  # a loop, not a recursion: values nest up to MAX_DEPTH inside each variable level
            item = pending.pop()
            if isinstance(item, str):
                c, d = self._string_cost(item, chain)
                cost, depth = cost + c, max(depth, d)
            elif isinstance(item, dict):
                cost += 1 + sum(len(k) if isinstance(k, str) else _NUMBER_COST for k in item)
                pending.extend(item.values())
            elif isinstance(item, (list, tuple)):
                cost += 1
                pending.extend(item)
            else:
                cost += _NUMBER_COST
        return cost, depth

    # ---- messages ----------------------------------------------------------------------------------

    def _unknown_message(self, name: str) -> str:
        names = sorted(self._declared)
        if not names:
            return f"unknown variable {show(name)}: the rule files declare no variables (vars:)"
        listed = ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "")
        hint = get_close_matches(name, names, n=1) if len(name) <= 128 else []
        return f"unknown variable {show(name)} given by vars= / --set (the rule files declare: {listed})" + (
            f"; did you mean {hint[0]!r}?" if hint else ""
        )


class _TooDeep(Exception):
    def __init__(self, chain: list[str]) -> None:
        super().__init__(" -> ".join(chain))
        self.chain = chain


def _override_items(overrides: Mapping[str, Any] | None, top_file: str) -> list[tuple[str, Any]]:
    if overrides is None:
        return []
    if not isinstance(overrides, Mapping):
        raise RuleError(
            one_line(
                f"{top_file}: vars: vars= must be a mapping of variable names to values, got {type(overrides).__name__}"
            )
        )
    items = list(overrides.items())
    for name, _ in items:
        if not isinstance(name, str):
            raise RuleError(
                one_line(f"{top_file}: vars: variable names given by vars= / --set must be strings, got {show(name)}")
            )
    return items


def _check_value(value: Any, nodes: int, error) -> int:
    """Raise ``error(message)`` unless ``value`` is plain data OmegaConf takes; returns the running node count."""
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        nodes += 1
        if nodes > MAX_VARIABLE_NODES:
            raise error(f"the variables hold more than {MAX_VARIABLE_NODES:,} values in all")
        if depth > MAX_DEPTH:
            raise error(f"a variable's value is nested more than {MAX_DEPTH} levels deep")
        if isinstance(item, int) and not -_INT64 <= item < _INT64:
            raise error(f"a variable's integer must fit in 64 bits, got {show(item)}")
        if isinstance(item, _SCALARS):
            continue
        if isinstance(item, (list, tuple)):
            pending.extend((v, depth + 1) for v in item)
        elif isinstance(item, dict):
            for k, v in item.items():
                if not isinstance(k, _KEY_TYPES):
                    raise error(f"a key of a variable's mapping must be a string or number, got {show(k)}")
                pending.append((v, depth + 1))
        else:
            raise error(
                f"a variable's value must be a string, number, boolean, null, list or mapping, "
                f"got {type(item).__name__} {show(item)}"
            )
    return nodes
