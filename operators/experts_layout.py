"""What a Hugging Face v5 experts module computes, read off the module itself.

transformers v5 stores the routed experts of a layer as ONE module with stacked tensors, and marks the
class with ``@use_experts_implementation(is_concatenated=..., is_transposed=..., has_bias=...)``, which
copies those flags onto every instance. We read the flags rather than keep a per-family table, so a new
family with the same decorator works without code here:

- default (Qwen3-MoE, Qwen2-MoE, Mixtral, DeepSeek-V3, GLM-4-MoE): ``gate_up_proj [E, 2I, H]`` with the
  gate rows first, ``down_proj [E, H, I]``; ``act_fn(gate) * up``.
- GPT-OSS: transposed (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``), gate/up interleaved along
  the 2I axis (gate at even, up at odd positions), biases, and the clamped activation
  ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = clamp(gate, max=limit)``.

``ExpertWeights`` is the one canonical form the operators work with: per expert ``gate [E, I, H]``,
``up [E, I, H]``, ``down [E, H, I]`` (rows = output features, like ``nn.Linear.weight``), optional biases.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from ktinject.errors import OperatorError

Activation = Literal["silu", "gelu", "gelu_tanh", "relu", "gptoss_swiglu"]

# HF ``config.hidden_act`` names that we can run, mapped to our activation names.
_HF_ACTIVATIONS: dict[str, Activation] = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "relu": "relu",
}


@dataclasses.dataclass(frozen=True)
class ExpertsSpec:
    """Shapes and math of one experts module: everything but the weights."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    activation: Activation
    has_bias: bool
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0


@dataclasses.dataclass
class ExpertWeights:
    """Per-expert weights in the canonical (``nn.Linear``-like) orientation."""

    gate: torch.Tensor  # [E, I, H]
    up: torch.Tensor  # [E, I, H]
    down: torch.Tensor  # [E, H, I]
    gate_bias: torch.Tensor | None = None  # [E, I]
    up_bias: torch.Tensor | None = None  # [E, I]
    down_bias: torch.Tensor | None = None  # [E, H]


def _flag(module: nn.Module, name: str, default: bool) -> bool:
    return bool(getattr(module, name, default))


def experts_spec(module: nn.Module, *, name: str = "") -> ExpertsSpec:
    """Describe ``module`` (a HF v5 experts module); OperatorError if it is not one we understand."""
    where = f"module {name!r} ({type(module).__name__})"
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        raise OperatorError(
            f"{where} is not a fused experts module: expected tensors 'gate_up_proj' and 'down_proj' "
            "(transformers v5 layout); match the '...mlp.experts' module, not the MoE block"
        )
    if not _flag(module, "has_gate", True) or _flag(module, "has_post_expert_norm", False):
        raise OperatorError(f"{where}: experts without a gate or with a post-expert norm are not supported")
    if gate_up.dim() != 3 or down.dim() != 3:
        raise OperatorError(f"{where}: expected 3-D gate_up_proj/down_proj, got {tuple(gate_up.shape)}/{tuple(down.shape)}")
    transposed = _flag(module, "is_transposed", False)
    num_experts = gate_up.shape[0]
    if transposed:
        hidden, two_inter = gate_up.shape[1], gate_up.shape[2]
        expected_down = (num_experts, two_inter // 2, hidden)
    else:
        two_inter, hidden = gate_up.shape[1], gate_up.shape[2]
        expected_down = (num_experts, hidden, two_inter // 2)
    if two_inter % 2 or tuple(down.shape) != expected_down:
        raise OperatorError(
            f"{where}: gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} do not describe "
            f"the same experts (expected down_proj {expected_down})"
        )
    has_bias = _flag(module, "has_bias", False)
    if hasattr(module, "limit") and hasattr(module, "alpha"):
        if _flag(module, "is_concatenated", True):
            raise OperatorError(f"{where}: clamped swiglu with concatenated gate/up is not a known layout")
        activation: Activation = "gptoss_swiglu"
        alpha, limit = float(module.alpha), float(module.limit)
    else:
        if not _flag(module, "is_concatenated", True):
            raise OperatorError(f"{where}: interleaved gate/up without GPT-OSS's clamped swiglu is not supported")
        hidden_act = getattr(getattr(module, "config", None), "hidden_act", "silu")
        if hidden_act not in _HF_ACTIVATIONS:
            raise OperatorError(f"{where}: activation {hidden_act!r} is not supported (supported: {sorted(_HF_ACTIVATIONS)})")
        activation = _HF_ACTIVATIONS[hidden_act]
        alpha, limit = 1.702, 7.0
    return ExpertsSpec(
        num_experts=num_experts,
        hidden_size=hidden,
        intermediate_size=two_inter // 2,
        activation=activation,
        has_bias=has_bias,
        swiglu_alpha=alpha,
        swiglu_limit=limit,
    )


def split_gate_up(gate_up: torch.Tensor, spec: ExpertsSpec, *, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a stacked gate_up tensor (weight ``[E, ., .]`` or bias ``[E, 2I]``) into canonical gate and up."""
    if gate_up.dim() == 3 and transposed:
        gate_up = gate_up.transpose(1, 2)  # -> [E, 2I, H]
    if spec.activation == "gptoss_swiglu":  # interleaved along the 2I axis
        return gate_up[:, 0::2].contiguous(), gate_up[:, 1::2].contiguous()
    inter = spec.intermediate_size
    return gate_up[:, :inter].contiguous(), gate_up[:, inter:].contiguous()


def canonical_weights(module: nn.Module, spec: ExpertsSpec) -> ExpertWeights:
    """Read ``module``'s tensors into the canonical orientation (copies; the module is left as is)."""
    transposed = _flag(module, "is_transposed", False)
    gate, up = split_gate_up(module.gate_up_proj.detach(), spec, transposed=transposed)
    down = module.down_proj.detach()
    down = down.transpose(1, 2).contiguous() if transposed else down.contiguous()
    weights = ExpertWeights(gate=gate, up=up, down=down)
    if spec.has_bias:
        weights.gate_bias, weights.up_bias = split_gate_up(module.gate_up_proj_bias.detach(), spec, transposed=transposed)
        weights.down_bias = module.down_proj_bias.detach().contiguous()
    return weights


def apply_activation(gate: torch.Tensor, up: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    """``act(gate) * up`` for the spec's activation (the reference math the C++ kernels must match)."""
    act = spec.activation
    if act == "gptoss_swiglu":
        gate = gate.clamp(max=spec.swiglu_limit)
        up = up.clamp(min=-spec.swiglu_limit, max=spec.swiglu_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * spec.swiglu_alpha))
    if act == "silu":
        return nn.functional.silu(gate) * up
    if act == "gelu":
        return nn.functional.gelu(gate) * up
    if act == "gelu_tanh":
        return nn.functional.gelu(gate, approximate="tanh") * up
    return nn.functional.relu(gate) * up


def validate_routing(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, spec: ExpertsSpec, name: str) -> None:
    """Shape checks shared by the experts operators (cheap attribute reads only; no device sync)."""
    if hidden.dim() != 2 or hidden.shape[1] != spec.hidden_size:
        raise OperatorError(f"{name}: hidden_states must be [tokens, {spec.hidden_size}], got {tuple(hidden.shape)}")
    if top_k_index.shape != top_k_weights.shape or top_k_index.dim() != 2 or top_k_index.shape[0] != hidden.shape[0]:
        raise OperatorError(
            f"{name}: top_k_index {tuple(top_k_index.shape)} and top_k_weights {tuple(top_k_weights.shape)} "
            f"must both be [tokens={hidden.shape[0]}, k]"
        )
