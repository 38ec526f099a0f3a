"""``rules="auto"``: the family's built-in file when one ships, otherwise generic rules chosen by structure.

The generic MoE rules (``base/moe``) find the routed experts with ``match: {kind: experts}``, wherever the
family puts them, so a new family whose experts follow a known layout needs neither code nor a rule file.
A model without an experts module gets the dense rules (``base/dense``). The choice and its reason travel with
the rule set (``RuleSet.origin``) and are printed with the plan.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ktinject.errors import RuleError
from ktinject.rules.builtin import MODEL_TYPE_RULES, rules_for_model_type
from ktinject.rules.kinds import KINDS

GENERIC_MOE = "base/moe"
GENERIC_DENSE = "base/dense"


@dataclasses.dataclass(frozen=True)
class AutoChoice:
    """The built-in rule file ``rules="auto"`` picked, and why (one line)."""

    name: str
    reason: str

    @property
    def generic(self) -> bool:
        return self.name in (GENERIC_MOE, GENERIC_DENSE)


def choose_auto_rules(model_type: str | None, model: nn.Module | None = None) -> AutoChoice:
    """What ``rules="auto"`` loads for a model of ``model_type`` (``model``: the model itself, to look at).

    RuleError when neither tells: no model and a model type without a built-in file (or none at all).
    """
    if model_type in MODEL_TYPE_RULES:
        name = MODEL_TYPE_RULES[model_type]
        return AutoChoice(name, f"auto: built-in rules '{name}' for model_type {model_type!r}")
    if model is None:
        if model_type is None:
            raise RuleError("rules='auto' needs the model (or its config.model_type) to choose the rules")
        rules_for_model_type(model_type)  # raises the RuleError that says what is missing
    assert model is not None
    what = f"model_type {model_type!r}" if model_type else "this model (no config.model_type)"
    experts = sum(1 for module in model.modules() if KINDS["experts"](module))
    if experts:
        return AutoChoice(
            GENERIC_MOE,
            f"auto: no built-in file for {what}; generic MoE rules ({experts} experts modules found by structure)",
        )
    return AutoChoice(GENERIC_DENSE, f"auto: no built-in file for {what}; no experts module found: generic dense rules")
