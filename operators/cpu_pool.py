"""What the CPU operators share: their kwargs for the pinned pool and the weights, running on the CPU only, and
the dispatching form the built-in rules use (our kernels on the CPU, transformers' module elsewhere)."""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import torch
from ktinject.operators.cpu_weights import IsaName, WeightTypeName
from torch import nn

from ktinject.errors import OperatorError
from ktinject.operator import KwargError, Operator, OperatorConfig, check_int


@dataclasses.dataclass(frozen=True)
class CpuPoolConfig(OperatorConfig):
    weight_type: WeightTypeName = "auto"  # auto: as stored in a GGUF; a live module keeps its dtype (bf16/f16/f32)
    threads: int = 0  # worker threads; 0 = every CPU of the chosen NUMA nodes (operators with one layout share a pool)
    numa_nodes: int = 0  # node groups; 0 = every node. More than the machine has splits its CPUs (testing)
    isa: IsaName = "auto"  # kernel family; auto = the best this CPU runs (or KTINJECT_ISA)

    def __post_init__(self) -> None:
        # What the pool can pin (csrc choose_layout): at most one worker per CPU this process may run on, at
        # least one worker per node group; checked here so a rule file fails at load time, not in the extension.
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        check_int("threads", self.threads, 0, cpus, f" (0 = every CPU; this process may run on {cpus})")
        check_int(
            "numa_nodes", self.numa_nodes, 0, cpus, f" (0 = every node; each node group needs one of the {cpus} CPUs)"
        )
        if self.threads and self.numa_nodes > self.threads:
            raise KwargError(
                "numa_nodes", f"numa_nodes={self.numa_nodes} needs at least as many threads, got threads={self.threads}"
            )


class CpuOperator(Operator):
    """An operator whose kernels run on the CPU's pinned pool."""

    @classmethod
    def check_device(cls, device: torch.device, config: OperatorConfig) -> None:
        if device.type != "cpu":
            raise OperatorError(f"{cls.op_name or cls.__name__} computes on the CPU, not on {device} (use device: cpu)")


class CpuOrPlaced(Operator):
    """A dispatching operator: ``cpu_operator`` on the CPU; on any other device the module is only placed there
    (as ``keep`` does), so transformers' own module runs and more specific rules may claim its children. The
    built-in rules use these so that one rule file fits a GPU placement and a CPU-only one."""

    cpu_operator: ClassVar[type[Operator]]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "cpu_operator" in cls.__dict__:
            cls.yields_to_earlier_rules = cls.cpu_operator.yields_to_earlier_rules

    @classmethod
    def places_only(cls, device: torch.device) -> bool:
        return device.type != "cpu"

    @classmethod
    def cpu_config(cls, config: OperatorConfig) -> OperatorConfig:
        return cls.cpu_operator.Config(**dataclasses.asdict(config))

    @classmethod
    def from_module(cls, module: nn.Module, *, name: str, device: torch.device, config: OperatorConfig) -> nn.Module:
        return cls.cpu_operator.from_module(module, name=name, device=device, config=cls.cpu_config(config))

    @classmethod
    def estimate_bytes(cls, module: nn.Module, config: OperatorConfig) -> int:
        return cls.cpu_operator.estimate_bytes(module, cls.cpu_config(config))

    @classmethod
    def estimate_stored_bytes(cls, module: nn.Module, config: OperatorConfig, device: torch.device, stored) -> int:
        return cls.cpu_operator.estimate_stored_bytes(module, cls.cpu_config(config), device, stored)
