"""Rule files: parsing, validation and the shipped rule sets. Never imports the CLI."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

from torch import nn

from ktinject.errors import RuleError
from ktinject.messages import show
from ktinject.rules.auto import AutoChoice, choose_auto_rules
from ktinject.rules.builtin import builtin_rule_names, builtin_rule_path, rules_for_model_type
from ktinject.rules.loader import load_rule_file, parse_rules
from ktinject.rules.schema import Match, Replace, Rule, RuleSet, SourceLocation

RulesLike = Union[str, Path, RuleSet]

logger = logging.getLogger("ktinject")

__all__ = [
    "AutoChoice",
    "Match",
    "Replace",
    "Rule",
    "RuleSet",
    "RulesLike",
    "SourceLocation",
    "builtin_rule_names",
    "choose_auto_rules",
    "load_rules",
    "parse_rules",
    "rules_for_model_type",
]


def _looks_like_yaml(text: str) -> bool:
    stripped = text.lstrip()
    return "\n" in text.strip() or stripped.startswith(("rules:", "include:", "vars:", "- ", "{", "["))


def _is_file(name: str) -> bool:
    try:
        return Path(name).is_file()
    except (OSError, ValueError):  # a name the OS refuses (too long, a NUL byte) is no file
        return False


def load_rules(
    rules: RulesLike,
    *,
    vars: Mapping[str, Any] | None = None,
    model_type: str | None = None,
    model: nn.Module | None = None,
) -> RuleSet:
    """Load rules from a file path, a built-in name (``"qwen3_moe"``), YAML text, or pass a RuleSet through.

    ``vars`` override the files' variables (e.g. ``{"gpu": "cpu"}`` to run the shipped rules without a GPU).
    ``"auto"`` picks the shipped file for ``model_type`` (``config.model_type``) when the family has one, else
    generic rules chosen by ``model``'s structure (MoE when it has an experts module, dense otherwise); the
    choice and its reason are the RuleSet's ``origin``.
    """
    if isinstance(rules, RuleSet):
        if vars:
            raise RuleError("vars= cannot be applied to an already loaded RuleSet; pass the file or name instead")
        return rules
    if isinstance(rules, Path):
        return load_rule_file(rules, vars=vars)
    if not isinstance(rules, str):
        raise RuleError(f"rules must be a path, a built-in name, YAML text or a RuleSet, got {type(rules).__name__}")
    if rules == "auto":
        choice = choose_auto_rules(model_type, model)
        builtin = builtin_rule_path(choice.name)
        if builtin is None:
            raise RuleError(
                f"rules='auto' chose the built-in rules {choice.name!r}, which this installation lacks (reinstall ktinject)"
            )
        logger.info("%s", choice.reason)
        return dataclasses.replace(load_rule_file(builtin, vars=vars), origin=choice.reason)
    if _looks_like_yaml(rules):
        return parse_rules(rules, vars=vars)
    if _is_file(rules):
        return load_rule_file(rules, vars=vars)
    builtin = builtin_rule_path(rules)
    if builtin is not None:
        return load_rule_file(builtin, vars=vars)
    raise RuleError(
        f"{show(rules)} is not a rule file, a built-in rule name or YAML text "
        f"(built-in: {', '.join(n for n in builtin_rule_names() if not n.startswith('base/'))})"
    )
