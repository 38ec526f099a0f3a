"""``attention``: a transformers self-attention module with the fastest kernels we have on the rule's device.

On the CPU it is ``cpu_attention`` (projections, q/k norm, rotary and attention in our C++ kernels around
transformers' cache). On any other device the module stays transformers' own, placed there like ``keep``, and
its projections are left to the rules that match them (``linear`` in the built-in rules). The built-in rules
use it so that one rule file runs attention at full speed whether ``${vars.gpu}`` is a GPU or the CPU.
"""

from __future__ import annotations

import dataclasses

import torch
from ktinject.operators.cpu_attention import CpuAttention, CpuAttentionConfig
from torch import nn

from ktinject.operator import Operator, register_operator


@dataclasses.dataclass(frozen=True)
class AttentionConfig(CpuAttentionConfig):
    """As cpu_attention's (weight_type, threads, numa_nodes, isa, native_tokens); ignored off the CPU."""


@register_operator("attention")
class Attention(Operator):
    """Replaces the module by ``cpu_attention`` on the CPU; only places it on any other device."""

    Config = AttentionConfig

    @classmethod
    def places_only(cls, device: torch.device) -> bool:
        return device.type != "cpu"

    @classmethod
    def from_module(cls, module: nn.Module, *, name: str, device: torch.device, config: AttentionConfig) -> nn.Module:
        return CpuAttention.from_module(module, name=name, device=device, config=_cpu_config(config))

    @classmethod
    def estimate_bytes(cls, module: nn.Module, config: AttentionConfig) -> int:
        return CpuAttention.estimate_bytes(module, _cpu_config(config))

    @classmethod
    def estimate_stored_bytes(cls, module: nn.Module, config: AttentionConfig, device: torch.device, stored) -> int:
        return CpuAttention.estimate_stored_bytes(module, _cpu_config(config), device, stored)


def _cpu_config(config: AttentionConfig) -> CpuAttentionConfig:
    return CpuAttentionConfig(**dataclasses.asdict(config))
