"""ktinject: turn a stock Hugging Face model into a hybrid CPU/GPU model with a YAML rule file.

import ktinject
plan = ktinject.optimize(model, "qwen3_moe")   # or a path, "auto", YAML text, a RuleSet
model.generate(...)                            # stock transformers generate()
"""

from __future__ import annotations

from ktinject.decoding import compile_decoding
from ktinject.errors import KtInjectError, OperatorError, RuleError, WeightError
from ktinject.injection import optimize
from ktinject.injection import plan_for as plan
from ktinject.loading import from_pretrained
from ktinject.operator import Operator, OperatorConfig, register_operator, registered_operators, resolve_operator
from ktinject.planning import Plan, PlanEntry
from ktinject.rules import Rule, RuleSet, builtin_rule_names, load_rules

__version__ = "0.1.0"

__all__ = [
    "KtInjectError",
    "Operator",
    "OperatorConfig",
    "OperatorError",
    "Plan",
    "PlanEntry",
    "Rule",
    "RuleError",
    "RuleSet",
    "WeightError",
    "builtin_rule_names",
    "compile_decoding",
    "from_pretrained",
    "load_rules",
    "optimize",
    "plan",
    "register_operator",
    "registered_operators",
    "resolve_operator",
]
