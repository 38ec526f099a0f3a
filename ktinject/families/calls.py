"""Random arguments for one call of an experts module, whatever its call contract (module-level parity checks)."""

from __future__ import annotations

import torch

from ktinject.operators.experts_layout import ExpertsSpec


def experts_call(spec: ExpertsSpec, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(hidden, top_k_index, top_k_weights)`` for routed experts (identity experts included in the ids,
    ``hidden [1, T, H]`` for DBRX), ``(hidden[E*T, H],)`` for Llama-4's dense call."""
    g = torch.Generator().manual_seed(seed)
    if spec.call == "dense":  # every expert gets its own block of rows
        return (torch.randn(spec.num_experts * 3, spec.hidden_size, generator=g),)
    tokens, k = 5, 2
    total = spec.num_experts + spec.identity_experts
    index = torch.stack([torch.randperm(total, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    shape = (1, tokens, spec.hidden_size) if spec.hidden_3d else (tokens, spec.hidden_size)
    return torch.randn(*shape, generator=g), index, weights
