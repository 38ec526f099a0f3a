"""``linear``: an ``nn.Linear`` with the fastest kernels we have on the rule's device.

On the CPU it is ``cpu_linear`` (our C++ kernels over stored GGUF blocks or float rows); on any other device it
is ``torch_linear`` in the dtype ``weight_type`` names. The built-in rules use it so that one rule file runs
every projection at full speed whether ``${vars.gpu}`` is a GPU or the CPU.
"""

from __future__ import annotations

import dataclasses

import torch
from ktinject.operators.cpu_linear import CpuLinear, CpuLinearConfig
from ktinject.operators.cpu_pool import CpuPoolConfig
from ktinject.operators.torch_linear import TorchLinear, TorchLinearConfig
from torch import nn

from ktinject.errors import OperatorError
from ktinject.operator import Operator, register_operator

# weight_type -> torch_linear's dtype, for devices other than the CPU.
_TORCH_DTYPES = {"auto": "auto", "bf16": "bfloat16", "f16": "float16", "f32": "float32"}


@dataclasses.dataclass(frozen=True)
class LinearConfig(CpuPoolConfig):
    """As cpu_linear's; on devices other than the CPU weight_type is auto | bf16 | f16 | f32 and the pool's kwargs
    are ignored."""


@register_operator("linear")
class Linear(Operator):
    """Dispatches to ``cpu_linear`` on the CPU and ``torch_linear`` elsewhere."""

    Config = LinearConfig

    @classmethod
    def check_device(cls, device: torch.device, config: LinearConfig) -> None:
        if device.type != "cpu" and config.weight_type not in _TORCH_DTYPES:
            raise OperatorError(
                f"linear: weight_type {config.weight_type} runs on the CPU only; on {device} use "
                "auto, bf16, f16 or f32 (or marlin_linear for 4-bit weights)"
            )

    @classmethod
    def from_module(cls, module: nn.Module, *, name: str, device: torch.device, config: LinearConfig) -> nn.Module:
        cls.check_device(device, config)
        if device.type == "cpu":
            cpu = CpuLinearConfig(
                weight_type=config.weight_type, threads=config.threads, numa_nodes=config.numa_nodes, isa=config.isa
            )
            return CpuLinear.from_module(module, name=name, device=device, config=cpu)
        return TorchLinear.from_module(
            module, name=name, device=device, config=TorchLinearConfig(dtype=_TORCH_DTYPES[config.weight_type])
        )

    @classmethod
    def estimate_bytes(cls, module: nn.Module, config: LinearConfig) -> int:
        return CpuLinear.estimate_bytes(module, CpuLinearConfig(weight_type=config.weight_type))

    @classmethod
    def estimate_stored_bytes(cls, module: nn.Module, config: LinearConfig, device: torch.device, stored) -> int:
        if device.type != "cpu":  # torch_linear holds the dequantized weight
            return super().estimate_stored_bytes(module, config, device, stored)
        return CpuLinear.estimate_stored_bytes(module, CpuLinearConfig(weight_type=config.weight_type), device, stored)
