"""``match.kind``: modules recognised by what they are, not by their name or class.

A name regex ties a rule to one family's module tree (``model.layers.N.mlp.experts``) and a class name to
one family's class (``Qwen3MoeExperts``); a kind holds for every family whose module computes the same
thing, wherever it sits (``model.language_model.layers.N.mlp.experts``, ``transformer.blocks.N.ffn.experts``,
``model.layers.N.mixer.experts`` ...). That is what lets the shipped rules run a family they were never
written for.

Each kind is a cheap structural test (attribute and shape reads, nothing run), because a rule with a kind
is tried on every module of the model a plan visits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn


def _is_experts(module: nn.Module) -> bool:
    from ktinject.operators.experts_layout import looks_like_experts

    return looks_like_experts(module)


def _is_attention(module: nn.Module) -> bool:
    from ktinject.operators.attention_layout import unsupported_attention

    return unsupported_attention(module) is None


def _is_decoder_layer(module: nn.Module) -> bool:
    from ktinject.operators.cpu_decoder_layer import unsupported_decoder_layer

    return unsupported_decoder_layer(module) is None


def _is_rmsnorm(module: nn.Module) -> bool:
    from ktinject.operators.cpu_norm import unsupported_rmsnorm

    return unsupported_rmsnorm(module) is None


def _is_router(module: nn.Module) -> bool:
    from ktinject.operators.cpu_router import router_form

    return router_form(module) is not None


def _is_linear(module: nn.Module) -> bool:
    # A subclass that overrides forward computes something else with the same weight (DeepSeek-V4's grouped
    # o_a_proj, Llama-4's router): replacing it by a plain linear would give wrong numbers, so it is no linear.
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


@dataclasses.dataclass(frozen=True)
class ModuleKind:
    """One value of ``match.kind``."""

    name: str
    description: str  # for the README and error messages
    test: Callable[[nn.Module], bool]

    def __call__(self, module: nn.Module) -> bool:
        return self.test(module)


KINDS: dict[str, ModuleKind] = {
    kind.name: kind
    for kind in (
        ModuleKind(
            "experts",
            "a transformers v5 routed-experts module (stacked per-expert weights: fused gate_up_proj/"
            "up_proj + down_proj, or DBRX's mlp.w1/v1/w2), wherever it sits",
            _is_experts,
        ),
        ModuleKind(
            "attention",
            "a transformers self-attention module of the standard form (q/k/v/o projections, optional per-head "
            "q/k RMSNorm, rotate-half rotary embedding, grouped-query softmax attention): Llama, Mistral, "
            "Mixtral, Qwen2(-MoE), Qwen3(-MoE), dots.llm1, GLM-4-MoE (partial rotary) and the families that reuse their "
            "attention",
            _is_attention,
        ),
        ModuleKind(
            "decoder_layer",
            "a pre-norm decoder layer of the Llama (or Mixtral) form whose parts cpu_decoder_layer runs: standard attention, "
            "RMSNorms, then a Qwen3-MoE-form sparse MoE block (router, routed experts), a DeepSeek-V3-form MoE "
            "block (router, routed experts, shared experts), a Qwen2-MoE-form block (plus a sigmoid-gated shared "
            "expert) or a SiLU-gated MLP",
            _is_decoder_layer,
        ),
        ModuleKind(
            "rmsnorm",
            "a transformers RMSNorm of the Llama form (weight * x / rms(x), computed in float32), whatever its class",
            _is_rmsnorm,
        ),
        ModuleKind(
            "router",
            "a transformers MoE router of the Qwen3-MoE or Mixtral form (softmax, top-k, optional renormalization) or of the "
            "DeepSeek-V3 form (sigmoid + correction bias, best groups, top-k, optional renormalization, scaling)",
            _is_router,
        ),
        ModuleKind(
            "linear",
            "an nn.Linear whose forward is nn.Linear's (subclasses computing something else are not)",
            _is_linear,
        ),
    )
}


def module_kind(name: str) -> ModuleKind | None:
    """The kind called ``name``, or None."""
    return KINDS.get(name)
