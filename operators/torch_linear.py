"""``torch_linear``: an ``nn.Linear`` replacement on any device, in a chosen dtype (pure torch reference).

Inputs are moved to the operator's device and the result goes back to the caller's device and dtype, so
the code around it never sees a device change.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from ktinject.operators.devices import DtypeName, frozen_parameter, resolve_dtype
from torch import nn

from ktinject.errors import OperatorError
from ktinject.operator import Operator, OperatorConfig, register_operator
from ktinject.weights.source import WeightSource


@dataclasses.dataclass(frozen=True)
class TorchLinearConfig(OperatorConfig):
    dtype: DtypeName = "auto"  # compute/storage dtype; "auto" keeps the module's


@register_operator("torch_linear")
class TorchLinear(Operator):
    Config = TorchLinearConfig

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool, device: torch.device, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = frozen_parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = frozen_parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_module(
        cls, module: nn.Module, *, name: str, device: torch.device, config: TorchLinearConfig
    ) -> "TorchLinear":
        if not isinstance(module, nn.Linear):
            raise OperatorError(f"torch_linear replaces nn.Linear, but {name!r} is {type(module).__name__}")
        dtype = resolve_dtype(config.dtype, module.weight.dtype)
        op = cls(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=torch.device("meta"),
            dtype=dtype,
        )
        if module.weight.is_meta:
            op.to_empty(device=device)
        else:
            op.weight = frozen_parameter(module.weight.detach().to(device=device, dtype=dtype))
            if module.bias is not None:
                op.bias = frozen_parameter(module.bias.detach().to(device=device, dtype=dtype))
        return op

    def weight_names(self) -> list[str]:
        return ["weight", "bias"] if self.bias is not None else ["weight"]

    def load_weights(self, source: WeightSource, prefix: str) -> None:
        for wname in self.weight_names():
            param = getattr(self, wname)
            setattr(
                self, wname, frozen_parameter(source.tensor(prefix + wname, dtype=param.dtype, device=param.device))
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        y = F.linear(x.to(device=w.device, dtype=w.dtype), w, self.bias)
        return y.to(device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
