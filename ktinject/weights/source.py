"""The ``WeightSource`` interface operators load their tensors through.

Every source answers the same four questions about a tensor named as in the HF model's ``state_dict``:
``names()``, ``info(name)`` (shape and stored type), ``raw(name)`` (as stored: quantized blocks stay
blocks) and ``tensor(name, dtype, device)`` (dequantized). ``ModuleSource`` serves a live module, which is
how ``optimize()`` hands an operator the weights of the module it replaces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Protocol

import torch
from torch import nn

from ktinject.errors import WeightError


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Shape (in the HF orientation) and how the tensor is stored (a torch dtype name or a GGUF type name)."""

    name: str
    shape: tuple[int, ...]
    stored_type: str


class WeightSource(Protocol):
    """Where an operator's tensors come from."""

    def names(self) -> Iterable[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def raw(self, name: str) -> object: ...

    def tensor(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor: ...


class ModuleSource:
    """The parameters and persistent buffers of a live module, by ``state_dict`` name."""

    def __init__(self, module: nn.Module, *, description: str = "module") -> None:
        self._tensors = {k: v for k, v in module.state_dict(keep_vars=True).items()}
        self._description = description

    def names(self) -> Iterable[str]:
        return self._tensors.keys()

    def _get(self, name: str) -> torch.Tensor:
        try:
            tensor = self._tensors[name]
        except KeyError:
            raise WeightError(f"{self._description} has no tensor {name!r} (has: {', '.join(self._tensors)})") from None
        if tensor.is_meta:
            raise WeightError(f"{self._description}: tensor {name!r} is on the meta device (no data to load)")
        return tensor.detach()

    def info(self, name: str) -> TensorInfo:
        tensor = self._tensors.get(name)
        if tensor is None:
            raise WeightError(f"{self._description} has no tensor {name!r}")
        return TensorInfo(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))

    def raw(self, name: str) -> torch.Tensor:
        return self._get(name)

    def tensor(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        return self._get(name).to(device=device, dtype=dtype)
