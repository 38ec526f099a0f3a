"""Device/dtype helpers shared by the operators (dtype names and their resolution live in ``ktinject.devices``)."""

from __future__ import annotations

import torch

from ktinject.devices import DtypeName, resolve_dtype

__all__ = ["DtypeName", "frozen_parameter", "resolve_dtype"]


def frozen_parameter(tensor: torch.Tensor) -> torch.nn.Parameter:
    """Inference weights: a Parameter (so ``.to()``/``state_dict`` see it) that never asks for grads."""
    return torch.nn.Parameter(tensor, requires_grad=False)
