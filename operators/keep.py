"""``keep``: leave the module as it is and only place it on the rule's device.

Placement is applied by the injector (it knows which sub-modules other rules claim), so this class only
declares that it places (``placement_only``) and takes no kwargs; nothing is ever built from it.
"""

from __future__ import annotations

from ktinject.operator import Operator, OperatorConfig, register_operator


@register_operator("keep")
class Keep(Operator):
    """Placement only: the module keeps its class and code; its tensors move to the rule's device."""

    Config = OperatorConfig
    placement_only = True
