"""``attention``: a transformers self-attention module with the fastest kernels we have on the rule's device.

On the CPU it is ``cpu_attention`` (projections, q/k norm, rotary and attention in our C++ kernels around
transformers' cache). On any other device the module stays transformers' own, placed there like ``keep``, and
its projections are left to the rules that match them (``linear`` in the built-in rules).
"""

from __future__ import annotations

import dataclasses

from ktinject.operators.cpu_attention import CpuAttention, CpuAttentionConfig
from ktinject.operators.cpu_pool import CpuOrPlaced

from ktinject.operator import register_operator


@dataclasses.dataclass(frozen=True)
class AttentionConfig(CpuAttentionConfig):
    """As cpu_attention's (weight_type, threads, numa_nodes, isa, native_tokens); ignored off the CPU."""


@register_operator("attention")
class Attention(CpuOrPlaced):
    """Replaces the module by ``cpu_attention`` on the CPU; only places it on any other device."""

    Config = AttentionConfig
    cpu_operator = CpuAttention
