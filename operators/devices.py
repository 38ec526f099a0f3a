"""Small device/dtype helpers shared by the operators."""

from __future__ import annotations

from typing import Literal

import torch

DtypeName = Literal["auto", "float32", "bfloat16", "float16"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: DtypeName, default: torch.dtype) -> torch.dtype:
    """``"auto"`` keeps ``default`` (the replaced module's dtype); other names pick that dtype."""
    return default if name == "auto" else _DTYPES[name]


def frozen_parameter(tensor: torch.Tensor) -> torch.nn.Parameter:
    """Inference weights: a Parameter (so ``.to()``/``state_dict`` see it) that never asks for grads."""
    return torch.nn.Parameter(tensor, requires_grad=False)
