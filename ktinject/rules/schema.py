"""The validated, in-memory form of a rule file: ``RuleSet`` of ``Rule(match, replace)``.

Everything here is already checked (regexes compiled, operator classes resolved, kwargs turned into the
operator's typed config, devices parsed), so planning and injection never meet a malformed rule.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ktinject.operator import Operator, OperatorConfig
from ktinject.rules.kinds import ModuleKind


@dataclasses.dataclass(frozen=True)
class SourceLocation:
    """Where a rule came from, for messages: ``file:line``."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclasses.dataclass(frozen=True)
class Match:
    """Which modules a rule applies to. Every given condition must hold."""

    name: re.Pattern[str] | None = None  # re.search on the dotted module name
    class_name: str | None = None  # bare class name, compared with the names in the module's MRO
    class_type: type | None = None  # resolved dotted path, compared with isinstance
    kind: ModuleKind | None = None  # what the module is, by structure (``kinds``)

    def matches(self, module_name: str, module: nn.Module) -> bool:
        if self.name is not None and self.name.search(module_name) is None:
            return False
        if self.class_type is not None and not isinstance(module, self.class_type):
            return False
        if self.class_name is not None and all(c.__name__ != self.class_name for c in type(module).__mro__):
            return False
        if self.kind is not None and not self.kind(module):
            return False
        return True

    def describe(self) -> str:
        parts = []
        if self.name is not None:
            parts.append(f"name~{self.name.pattern!r}")
        if self.class_name or self.class_type:
            cls = self.class_name or f"{self.class_type.__module__}.{self.class_type.__qualname__}"  # type: ignore[union-attr]
            parts.append(f"class={cls}")
        if self.kind is not None:
            parts.append(f"kind={self.kind.name}")
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Replace:
    """What a matched module becomes, and where it lives."""

    op: str  # as written in the rule (short name or dotted path)
    op_class: type[Operator]
    device: torch.device
    kwargs: Mapping[str, Any]
    config: OperatorConfig

    @property
    def is_keep(self) -> bool:
        """The operator only places the module here (``keep``; ``attention`` off the CPU): nothing is built and
        more specific rules may claim its children."""
        return self.op_class.places_only(self.device)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule. ``index`` is its position in the RuleSet (its priority: lower wins)."""

    match: Match
    replace: Replace
    recursive: bool
    index: int
    location: SourceLocation
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or f"rule#{self.index}"


@dataclasses.dataclass(frozen=True)
class RuleSet:
    """An ordered list of rules (first match wins), the variables they were resolved with, and their files.

    ``origin``: why these rules were chosen, when ktinject chose them (``rules="auto"``); shown in plans.
    """

    rules: tuple[Rule, ...]
    vars: Mapping[str, Any]
    files: tuple[str, ...]
    origin: str = ""

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def first_match(self, module_name: str, module: nn.Module, *, after: int = -1) -> Rule | None:
        """The first rule (lowest index above ``after``) that matches the module, or None."""
        for rule in self.rules:
            if rule.index > after and rule.match.matches(module_name, module):
                return rule
        return None

    def __str__(self) -> str:
        lines = [f"RuleSet: {len(self.rules)} rules from {', '.join(self.files) or '<none>'}"]
        if self.origin:
            lines.append(f"  ({self.origin})")
        for r in self.rules:
            kw = f" {dict(r.replace.kwargs)}" if r.replace.kwargs else ""
            lines.append(
                f"  {r.index:>3} {r.label}: {r.match.describe()} -> {r.replace.op}@{r.replace.device}{kw}  ({r.location})"
            )
        return "\n".join(lines)
