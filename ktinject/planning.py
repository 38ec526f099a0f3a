"""``plan(model, rules)``: which rule claims which module, as a dry run. The model is not touched.

The walk is top-down over ``named_modules``: the first rule (in RuleSet order) that matches a module claims
it. A module replaced by an operator is a leaf of the plan (its children go with it); a ``keep`` module's
children are still visited unless the rule says ``recursive: false``, so a ``keep`` on the whole model
followed by more specific rules places "everything else".
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch import nn

from ktinject.errors import OperatorError
from ktinject.messages import format_ranges
from ktinject.rules import RuleSet
from ktinject.rules.builtin import is_builtin_rule_file
from ktinject.rules.schema import Rule
from ktinject.weights.assembled import FileSource
from ktinject.weights.source import TensorInfo


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """One claimed module."""

    module_name: str
    module_class: str
    rule: Rule
    estimated_bytes: int  # what the module will hold on its device (for keep: the tensors it owns)

    @property
    def op(self) -> str:
        return self.rule.replace.op

    @property
    def device(self) -> torch.device:
        return self.rule.replace.device

    @property
    def is_keep(self) -> bool:
        return self.rule.replace.is_keep


@dataclasses.dataclass(frozen=True)
class Plan:
    """The result of planning: entries in model order, rules that matched nothing, modules no rule covers."""

    entries: tuple[PlanEntry, ...]
    rules: RuleSet
    unmatched_rules: tuple[Rule, ...]
    uncovered_modules: tuple[str, ...]  # modules holding tensors that no rule (nor an ancestor's) places
    # (module, rule that would have claimed it whole, descendant, earlier rule claiming that descendant)
    yielded: tuple[tuple[str, Rule, str, Rule], ...] = ()

    def __iter__(self) -> Iterator[PlanEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def memory_by_device(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for entry in self.entries:
            totals[str(entry.device)] += entry.estimated_bytes
        return dict(totals)

    @property
    def suspicious_unmatched_rules(self) -> tuple[Rule, ...]:
        """Rules that matched nothing and were written for this model (not a shipped, multi-family file)."""
        return tuple(r for r in self.unmatched_rules if not is_builtin_rule_file(r.location.file))

    def devices(self) -> set[torch.device]:
        return {entry.device for entry in self.entries}

    def __str__(self) -> str:
        return format_plan(self)


def plan(model: nn.Module, rules: RuleSet, *, source: FileSource | None = None) -> Plan:
    """Match ``rules`` against ``model``'s modules without changing anything.

    ``source``: a weight file bound to ``model``; operators are then asked what they hold given how the file
    stores their tensors (``Operator.estimate_stored_bytes``: GGUF blocks kept as stored count their size).
    """
    entries: list[PlanEntry] = []
    used: set[int] = set()
    uncovered: list[str] = []

    def own_bytes(module: nn.Module) -> int:
        tensors = [*module._parameters.values(), *module._buffers.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    claimed_names: set[str] = set()

    yielded: list[tuple[str, Rule, str, Rule]] = []

    def earlier_rule_below(name: str, module: nn.Module, rule: Rule) -> tuple[str, Rule] | None:
        for child_name, child in module.named_modules():
            if child_name:
                full = f"{name}.{child_name}" if name else child_name
                first = rules.first_match(full, child)
                if first is not None and first.index < rule.index:
                    return full, first
        return None

    def visit(name: str, module: nn.Module, covered: bool) -> None:
        rule = rules.first_match(name, module)
        while rule is not None and rule.replace.op_class.yields_to_earlier_rules:
            blocker = earlier_rule_below(name, module, rule)
            if blocker is None:
                break
            yielded.append((name, rule, *blocker))
            rule = rules.first_match(name, module, after=rule.index)
        if rule is not None:
            used.add(rule.index)
            claimed_names.add(name)
            replace = rule.replace
            estimate = 0 if replace.is_keep else _estimate(rule, name, module, source)
            entries.append(PlanEntry(name, type(module).__name__, rule, estimate))
            if not replace.is_keep or not rule.recursive:
                return
            covered = True
        elif not covered and own_bytes(module):
            uncovered.append(name or "<root>")
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child, covered)

    visit("", model, False)
    entries = _fill_keep_estimates(model, entries, claimed_names, own_bytes)
    unmatched = tuple(r for r in rules.rules if r.index not in used)
    return Plan(tuple(entries), rules, unmatched, tuple(uncovered), tuple(yielded))


def _estimate(rule: Rule, name: str, module: nn.Module, source: FileSource | None) -> int:
    """The operator's memory estimate; an operator that cannot replace the module, or cannot run on the rule's
    device, says so here, at plan time."""
    replace = rule.replace
    try:
        replace.op_class.check_device(replace.device, replace.config)
    except OperatorError as exc:
        raise OperatorError(f"rule {rule.label} ({rule.location}): {exc}") from None
    try:
        if source is None:
            return replace.op_class.estimate_bytes(module, replace.config)
        return replace.op_class.estimate_stored_bytes(
            module, replace.config, replace.device, _stored(source, name, module)
        )
    except OperatorError as exc:
        raise OperatorError(
            f"rule {rule.label} ({rule.location}) matches {name or '<root>'} "
            f"({type(module).__name__}), which {rule.replace.op} cannot replace: {exc}"
        ) from None


def _stored(source: FileSource, name: str, module: nn.Module) -> dict[str, TensorInfo]:
    """How ``source`` stores ``module``'s tensors (names relative to the module; those it lacks are left out:
    loading reports them, planning does not)."""
    prefix = f"{name}." if name else ""
    return {key: source.info(prefix + key) for key in module.state_dict() if source.resolves(prefix + key)}


def _fill_keep_estimates(model: nn.Module, entries: list[PlanEntry], claimed: set[str], own_bytes) -> list[PlanEntry]:
    """A keep entry holds the tensors of its subtree that no more specific entry claims."""
    modules = dict(model.named_modules())
    result = []
    for entry in entries:
        if entry.is_keep:
            total = 0
            stack = [(entry.module_name, modules[entry.module_name])]
            while stack:  # a non-recursive keep has no claimed descendants: they were never visited
                name, module = stack.pop()
                total += own_bytes(module)
                for child_name, child in module.named_children():
                    full = f"{name}.{child_name}" if name else child_name
                    if full not in claimed:
                        stack.append((full, child))
            entry = dataclasses.replace(entry, estimated_bytes=total)
        result.append(entry)
    return result


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


_FIRST_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def format_plan(p: Plan) -> str:
    """A readable table; entries that differ only in their first index (layer number) share one row."""
    groups: dict[tuple, list[int]] = {}  # insertion-ordered: rows follow model order
    bytes_by_key: dict[tuple, int] = defaultdict(int)
    for e in p.entries:
        m = _FIRST_INDEX.search(e.module_name)
        template = e.module_name[: m.start()] + ".{}" + e.module_name[m.end() :] if m else e.module_name
        key = (template, e.module_class, e.rule.label, e.op, str(e.device), e.rule.index)
        groups.setdefault(key, []).append(int(m.group(1)) if m else -1)
        bytes_by_key[key] += e.estimated_bytes
    rows = [("module", "class", "rule", "op", "device", "memory")]
    for key in groups:
        template, cls, label, op, device, _ = key
        idx = groups[key]
        name = template.replace("{}", "{" + format_ranges(idx) + "}") if "{}" in template else (template or "<root>")
        if "{}" in template and len(set(idx)) == 1:
            name = template.replace("{}", str(idx[0]))
        rows.append((name, cls, label, op, device, _human_bytes(bytes_by_key[key])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    if p.rules.origin:  # rules="auto": which rules were chosen and why
        lines.append(p.rules.origin)
    lines.append(f"{len(p.entries)} modules claimed by {len(p.rules) - len(p.unmatched_rules)} of {len(p.rules)} rules")
    memory = ", ".join(f"{dev}: {_human_bytes(n)}" for dev, n in sorted(p.memory_by_device().items()))
    lines.append(f"estimated memory per device: {memory or 'none'}")
    for name, rule, part, earlier in p.yielded:
        lines.append(
            f"note: rule {rule.label} left {name} to its parts: rule {earlier.label} ({earlier.location}) claims "
            f"{part} and comes first"
        )
    for rule in p.unmatched_rules:
        kind = "warning: rule" if rule in p.suspicious_unmatched_rules else "note: built-in rule"
        lines.append(f"{kind} {rule.label} ({rule.location}) matched no module")
    if p.uncovered_modules:
        shown = ", ".join(p.uncovered_modules[:5]) + (" ..." if len(p.uncovered_modules) > 5 else "")
        lines.append(
            f"warning: {len(p.uncovered_modules)} modules with tensors are not placed by any rule (they stay where they are): {shown}"
        )
    return "\n".join(lines)
