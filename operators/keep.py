"""``keep``: leave the module as it is and only place it on the rule's device.

Placement is applied by the injector (it knows which sub-modules other rules claim), so this class only
names the operation and validates that it takes no kwargs.
"""

from __future__ import annotations

import torch
from torch import nn

from ktinject.operator import Operator, OperatorConfig, register_operator


@register_operator("keep")
class Keep(Operator):
    """Placement only: the module keeps its class and code; its tensors move to the rule's device."""

    Config = OperatorConfig

    @classmethod
    def from_module(cls, module: nn.Module, *, name: str, device: torch.device, config: OperatorConfig) -> nn.Module:
        return module
