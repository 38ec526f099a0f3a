"""What a Hugging Face v5 experts module computes, read off the module itself.

transformers v5 stores the routed experts of a layer as ONE module with stacked tensors, and marks the
class with ``@use_experts_implementation(is_concatenated=..., is_transposed=..., has_bias=..., has_gate=...,
has_post_expert_norm=...)``, which copies those flags onto every instance. We read the flags and the
tensors' shapes, and recognise the activation by what it computes (the module's ``_apply_gate``/``act_fn``
is run on a probe and compared with our reference math), never by class, config key or module path, so a
new family with a known layout works without code here. The layouts found in transformers 5.x:

- fused, gated (most families): ``gate_up_proj [E, 2I, H]`` (gate rows first), ``down_proj [E, H, I]``;
  ``act(gate) * up`` with act one of silu, gelu, gelu_tanh, relu, relu2, quick_gelu.
- transposed (Aria, Llama-4, GPT-OSS): ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``.
- interleaved gate/up (GPT-OSS): gate at even, up at odd positions of the 2I axis.
- biases (GPT-OSS, OpenAI privacy filter): ``gate_up_proj_bias [E, 2I]``, ``down_proj_bias [E, H]``.
- gated activations with parameters: GPT-OSS's ``(clamp(up, ±L) + 1) * g * sigmoid(alpha * g)`` with
  ``g = clamp(gate, max=L)`` (interleaved or concatenated); ``silu(clamp(gate, max=L)) * clamp(up, ±L)``
  (DeepSeek-V4, HY-V4, GLM-5-Next); ``clamp(silu(gate), max=L) * clamp(up, ±L)`` (Step-3.7);
  ``softcap(gate) * sigmoid(gate) * softcap(up)`` with ``softcap(x) = c * tanh(x / c)`` (Inkling-2).
- not gated (Nemotron-H): ``up_proj [E, I, H]``, ``down_proj [E, H, I]``, ``act(up)``.
- a norm on every expert's output before the routing weight (Muse Spark): ``post_expert_norm``.
- identity ("zero-compute") experts after the routed ones (LongCat-Flash): ids ``E .. E+Z-1`` return
  their input times the routing weight; ``gate_up_proj`` has ``E+Z`` rows, ``down_proj`` ``E``.
- a dense call (Llama-4): ``experts(hidden[E*T, H]) -> [E*T, H]``, every expert on its own block of T rows
  (the MoE block has already scaled each row by its routing score).
- DBRX: ``mlp.w1``/``mlp.v1`` (gate/up) and ``mlp.w2`` (down, transposed) as flat ``[E*I, H]`` matrices in a
  child module, called with ``hidden [B, S, H]``.

``ExpertWeights`` is the one canonical form the operators work with: per expert ``gate [E, I, H]`` (None
when not gated), ``up [E, I, H]``, ``down [E, H, I]`` (rows = output features, like ``nn.Linear.weight``),
optional biases. ``ExpertsSpec.features`` names what a layout needs beyond the plain fused one, so an
operator states what it supports (``experts_spec(module, supports=...)``) and anything else is an
``OperatorError`` that names the module and the feature, never a silently wrong result. The features are
of two sorts: the math (``KERNEL_FEATURES``: what the C++ kernels compute) and the call layouts
(``CALL_LAYOUTS``: how the module is called and stores its weights, which an operator maps onto a routed
call around its kernels); ``cpu_experts`` and ``torch_experts`` run both.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Collection, Mapping
from typing import Literal

import torch
from torch import nn

from ktinject.errors import OperatorError

Activation = Literal[
    "silu",
    "gelu",
    "gelu_tanh",
    "relu",
    "relu2",
    "quick_gelu",
    "gptoss_swiglu",
    "clamped_swiglu",
    "swiglu_clamp_after",
    "softcapped_swiglu",
]
Storage = Literal["fused", "w1_v1_w2"]
Call = Literal["routed", "dense"]

# Elementwise activations, as the reference math (and the probe candidates).
ELEMENTWISE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": nn.functional.silu,
    "gelu": nn.functional.gelu,
    "gelu_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "relu": nn.functional.relu,
    "relu2": lambda x: nn.functional.relu(x).square(),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}
# Activations whose math involves both halves of gate_up beyond ``act(gate) * up``.
GATED_ONLY = ("gptoss_swiglu", "clamped_swiglu", "swiglu_clamp_after", "softcapped_swiglu")

# The math the C++ kernels implement (weights' orientation and the activation).
KERNEL_FEATURES: frozenset[str] = frozenset(
    {"transposed", "interleaved", "bias", "not gated"} | {f"activation {a}" for a in (*ELEMENTWISE, *GATED_ONLY)}
)
# How a module is called and stores its weights, beyond experts(hidden[T, H], index, weights) over fused
# tensors: an operator maps these onto a plain routed call (see cpu_experts).
CALL_LAYOUTS: frozenset[str] = frozenset(
    {"post-expert norm", "identity experts", "dense call", "w1/v1/w2 storage", "3-D hidden states"}
)
# Everything this module can describe: the default for ``experts_spec(supports=...)``; what cpu_experts and the
# pure-torch reference run.
ALL_FEATURES: frozenset[str] = KERNEL_FEATURES | CALL_LAYOUTS


@dataclasses.dataclass(frozen=True)
class ExpertsSpec:
    """Shapes and math of one experts module: everything but the weights."""

    num_experts: int  # routed experts that own weights
    hidden_size: int
    intermediate_size: int
    activation: Activation
    has_bias: bool
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0  # gptoss_swiglu / clamped_swiglu / swiglu_clamp_after
    gated: bool = True  # False: only an up projection, ``act(up)``
    interleaved: bool | None = None  # gate/up alternate along 2I; None: GPT-OSS's convention (its swiglu only)
    transposed: bool = False  # stored [E, in, out] instead of [E, out, in]
    storage: Storage = "fused"
    call: Call = "routed"
    identity_experts: int = 0  # ids num_experts .. num_experts + identity_experts - 1 return their input
    post_expert_norm: bool = False  # the module's ``post_expert_norm`` runs on each expert's output
    softcap_gate: float = 0.0  # softcapped_swiglu
    softcap_up: float = 0.0
    hidden_3d: bool = False  # called with hidden [B, S, H] and returns that shape (DBRX)

    def __post_init__(self) -> None:
        if self.interleaved is None:
            object.__setattr__(self, "interleaved", self.activation == "gptoss_swiglu")

    @property
    def features(self) -> frozenset[str]:
        """What this layout needs beyond fused, concatenated, bias-free ``act(gate) * up`` experts."""
        named = {
            "transposed": self.transposed,
            "interleaved": bool(self.interleaved),
            "bias": self.has_bias,
            "not gated": not self.gated,
            "post-expert norm": self.post_expert_norm,
            "identity experts": self.identity_experts > 0,
            "dense call": self.call == "dense",
            "w1/v1/w2 storage": self.storage == "w1_v1_w2",
            "3-D hidden states": self.hidden_3d,
        }
        return frozenset({f"activation {self.activation}"} | {k for k, on in named.items() if on})

    def describe(self) -> str:
        """One line for plans and catalogues, e.g. ``gated silu, transposed, bias``."""
        act = self.activation
        if act in ("gptoss_swiglu", "clamped_swiglu", "swiglu_clamp_after"):
            act += f"(limit={self.swiglu_limit:g}" + (
                f", alpha={self.swiglu_alpha:g})" if act == "gptoss_swiglu" else ")"
            )
        elif act == "softcapped_swiglu":
            act += f"(gate={self.softcap_gate:g}, up={self.softcap_up:g})"
        extra = sorted(f for f in self.features if not f.startswith("activation") and f != "not gated")
        return ", ".join([("gated " if self.gated else "not gated, ") + act, *extra])


@dataclasses.dataclass
class ExpertWeights:
    """Per-expert weights in the canonical (``nn.Linear``-like) orientation."""

    gate: torch.Tensor | None  # [E, I, H]; None when the experts are not gated
    up: torch.Tensor  # [E, I, H]
    down: torch.Tensor  # [E, H, I]
    gate_bias: torch.Tensor | None = None  # [E, I]
    up_bias: torch.Tensor | None = None  # [E, I]
    down_bias: torch.Tensor | None = None  # [E, H]


def _flag(module: nn.Module, name: str, default: bool) -> bool:
    return bool(getattr(module, name, default))


def _number(obj: object, *names: str) -> float | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _has(module: nn.Module, dotted: str) -> bool:
    owner, _, leaf = dotted.rpartition(".")
    try:
        return isinstance(getattr(module.get_submodule(owner), leaf, None), torch.Tensor)
    except AttributeError:
        return False


def looks_like_experts(module: nn.Module) -> bool:
    """True for a module holding stacked per-expert weights in a layout ``experts_spec`` reads (no probing).

    This is how a model's experts are found by what they are, wherever they sit: the fused/non-gated
    layouts hold 3-D ``down_proj`` plus ``gate_up_proj`` or ``up_proj`` with at least as many experts; DBRX's
    holds flat ``mlp.w1/v1/w2``.
    """
    down = getattr(module, "down_proj", None)
    if isinstance(down, torch.Tensor) and down.dim() == 3:
        first = getattr(module, "gate_up_proj" if _flag(module, "has_gate", True) else "up_proj", None)
        return isinstance(first, torch.Tensor) and first.dim() == 3 and first.shape[0] >= down.shape[0]
    return all(_has(module, f"mlp.{n}") for n in ("w1", "v1", "w2")) and hasattr(module, "num_experts")


def experts_spec(module: nn.Module, *, name: str = "", supports: Collection[str] = ALL_FEATURES) -> ExpertsSpec:
    """Describe ``module`` (a HF v5 experts module).

    OperatorError when it is not an experts module, when its math is not one we recognise, or when the
    layout needs a feature outside ``supports`` (default: every feature described here; an operator passes
    the set it runs). The message names the module and the feature.
    """
    where = f"module {name!r} ({type(module).__name__})"
    if all(_has(module, f"mlp.{n}") for n in ("w1", "v1", "w2")):
        spec = _w1_v1_w2_spec(module, where)
    else:
        spec = _stacked_spec(module, where)
    missing = sorted(spec.features - frozenset(supports))
    if missing:
        raise OperatorError(f"{where}: {missing[0]} is not supported by this operator (layout: {spec.describe()})")
    return spec


def _stacked_spec(module: nn.Module, where: str) -> ExpertsSpec:
    down = getattr(module, "down_proj", None)
    gated = _flag(module, "has_gate", True)
    first_name = "gate_up_proj" if gated else "up_proj"
    first = getattr(module, first_name, None)
    if not isinstance(first, torch.Tensor) or not isinstance(down, torch.Tensor):
        raise OperatorError(
            f"{where} is not a fused experts module: expected tensors '{first_name}' and 'down_proj' "
            "(transformers v5 layout); match the '...mlp.experts' module, not the MoE block"
        )
    if first.dim() != 3 or down.dim() != 3:
        raise OperatorError(
            f"{where}: expected 3-D {first_name}/down_proj, got {tuple(first.shape)}/{tuple(down.shape)}"
        )
    num_experts = down.shape[0]
    identity = first.shape[0] - num_experts
    if identity < 0 or (identity and not any(isinstance(m, nn.Identity) for m in module.children())):
        raise OperatorError(f"{where}: {first_name} has {first.shape[0]} experts but down_proj {num_experts}")
    transposed = _transposed(module, first, down, gated, where)
    width = first.shape[2] if transposed else first.shape[1]
    hidden = first.shape[1] if transposed else first.shape[2]
    inter = width // 2 if gated else width
    expected_down = (num_experts, inter, hidden) if transposed else (num_experts, hidden, inter)
    if (gated and width % 2) or tuple(down.shape) != expected_down:
        raise OperatorError(
            f"{where}: {first_name} {tuple(first.shape)} and down_proj {tuple(down.shape)} do not describe "
            f"the same experts (expected down_proj {expected_down})"
        )
    has_bias = _flag(module, "has_bias", False)
    if has_bias:
        for bias_name, shape in (
            (f"{first_name}_bias", (first.shape[0], width)),
            ("down_proj_bias", (num_experts, hidden)),
        ):
            bias = getattr(module, bias_name, None)
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != shape:
                found = tuple(bias.shape) if isinstance(bias, torch.Tensor) else None
                raise OperatorError(f"{where}: has_bias is set but {bias_name} is {found}, expected {shape}")
    post_norm = _flag(module, "has_post_expert_norm", False)
    if post_norm and not isinstance(getattr(module, "post_expert_norm", None), nn.Module):
        raise OperatorError(f"{where}: has_post_expert_norm is set but the module has no 'post_expert_norm' submodule")
    interleaved = not _flag(module, "is_concatenated", True)
    math_fields = _recognise_math(module, gated=gated, interleaved=interleaved, where=where)
    return ExpertsSpec(
        num_experts=num_experts,
        hidden_size=hidden,
        intermediate_size=inter,
        has_bias=has_bias,
        gated=gated,
        interleaved=interleaved,
        transposed=transposed,
        call=_call_kind(module, where),
        identity_experts=identity,
        post_expert_norm=post_norm,
        **math_fields,
    )


def _transposed(module: nn.Module, first: torch.Tensor, down: torch.Tensor, gated: bool, where: str) -> bool:
    """The decorator's flag when set; otherwise read off the shapes (unambiguous: see below)."""
    if hasattr(module, "is_transposed"):
        return bool(module.is_transposed)
    # first [E, a, b], down [E, c, d]: plain needs a = k*d, b = c; transposed needs b = k*c, a = d (k = 2 when
    # gated). Both at once would need c = 0, so at most one holds.
    k = 2 if gated else 1
    a, b = first.shape[1], first.shape[2]
    c, d = down.shape[1], down.shape[2]
    if a == k * d and b == c:
        return False
    if b == k * c and a == d:
        return True
    raise OperatorError(f"{where}: cannot tell the orientation of {tuple(first.shape)}/{tuple(down.shape)}")


def _call_kind(module: nn.Module, where: str) -> Call:
    """``routed``: ``forward(hidden, top_k_index, top_k_weights)``; ``dense``: ``forward(hidden)`` (Llama-4)."""
    params = [
        p
        for p in inspect.signature(type(module).forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"
    ]
    if len(params) >= 3:
        return "routed"
    if len(params) == 1:
        return "dense"
    raise OperatorError(
        f"{where}: forward takes {[p.name for p in params]}; expected (hidden, top_k_index, top_k_weights) or (hidden)"
    )


def _w1_v1_w2_spec(module: nn.Module, where: str) -> ExpertsSpec:
    w1, v1, w2 = (module.get_parameter(f"mlp.{n}") for n in ("w1", "v1", "w2"))
    num_experts = getattr(module, "num_experts", None)
    if not isinstance(num_experts, int) or num_experts <= 0 or w1.dim() != 2 or w1.shape[0] % num_experts:
        raise OperatorError(f"{where}: mlp.w1 {tuple(w1.shape)} is not num_experts={num_experts} stacked [I, H] blocks")
    if not (w1.shape == v1.shape == w2.shape):
        raise OperatorError(
            f"{where}: mlp.w1/v1/w2 shapes differ: {tuple(w1.shape)}, {tuple(v1.shape)}, {tuple(w2.shape)}"
        )
    act = getattr(module.mlp, "activation_fn", None)
    return ExpertsSpec(
        num_experts=num_experts,
        hidden_size=w1.shape[1],
        intermediate_size=w1.shape[0] // num_experts,
        activation=_recognise_elementwise(act, where),
        has_bias=False,
        storage="w1_v1_w2",
        hidden_3d=True,
    )


# ---- recognising the math -------------------------------------------------------------------------


def _probe_values(limit: float | None) -> torch.Tensor:
    """Gate/up probe: both signs, small and large values, past any clamp limit (float32, deterministic)."""
    reach = 16.0 if limit is None or not math.isfinite(limit) else max(16.0, 2.0 * limit + 4.0)
    grid = torch.linspace(-reach, reach, 97, dtype=torch.float64)
    return torch.cat([grid, torch.linspace(-2.0, 2.0, 31, dtype=torch.float64)]).to(torch.float32)


def _matches(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return actual.shape == expected.shape and bool(torch.allclose(actual, expected, rtol=1e-5, atol=1e-6))


def _recognise_elementwise(act: object, where: str) -> Activation:
    """Which of ``ELEMENTWISE`` the callable ``act`` computes (run on a probe)."""
    if not callable(act):
        raise OperatorError(f"{where}: no activation function ('act_fn') to read")
    x = _probe_values(None)
    try:
        with torch.no_grad():
            y = act(x)
    except Exception as exc:  # noqa: BLE001 - any failure means we cannot tell what it computes
        raise OperatorError(f"{where}: cannot run its activation {act!r} on a probe: {exc}") from None
    for name, fn in ELEMENTWISE.items():
        if isinstance(y, torch.Tensor) and _matches(y, fn(x)):
            return name  # type: ignore[return-value]
    raise OperatorError(f"{where}: activation {type(act).__name__} is none of {', '.join(ELEMENTWISE)}")


def _recognise_math(module: nn.Module, *, gated: bool, interleaved: bool, where: str) -> dict[str, object]:
    """The activation fields of the spec, from what the module's gate function computes on a probe."""
    act = getattr(module, "act_fn", None)
    if not gated:
        return {"activation": _recognise_elementwise(act, where)}
    gate_fn = getattr(module, "_apply_gate", None)
    if gate_fn is None:  # undecorated module whose forward computes act_fn(gate) * up itself (Llama-4, LongCat)
        return {"activation": _recognise_elementwise(act, where)}
    limit = _number(module, "limit", "swiglu_limit")
    alpha = _number(module, "alpha", "swiglu_alpha")
    caps = (
        _number(getattr(act, "gate_softcap", None), "softcap"),
        _number(getattr(act, "up_softcap", None), "softcap"),
    )
    candidates: list[dict[str, object]] = []
    if alpha is not None and limit is not None:
        candidates.append(dict(activation="gptoss_swiglu", swiglu_alpha=alpha, swiglu_limit=limit))
    if limit is not None and math.isfinite(limit):
        candidates += [
            dict(activation="clamped_swiglu", swiglu_limit=limit),
            dict(activation="swiglu_clamp_after", swiglu_limit=limit),
        ]
    if caps[0] is not None and caps[1] is not None:
        candidates.append(dict(activation="softcapped_swiglu", softcap_gate=caps[0], softcap_up=caps[1]))
    candidates += [dict(activation=name) for name in ELEMENTWISE]
    values = _probe_values(limit)
    gate = values
    up = values.flip(0) * 0.75 + 0.5  # a different sequence, so gate/up mix-ups are caught
    gate_up = torch.stack([gate, up], dim=-1).reshape(-1) if interleaved else torch.cat([gate, up])
    try:
        with torch.no_grad():
            out = gate_fn(gate_up[None])[0]
    except Exception as exc:  # noqa: BLE001 - any failure means we cannot tell what it computes
        raise OperatorError(f"{where}: cannot run its gate function on a probe: {exc}") from None
    for fields in candidates:
        probe_spec = ExpertsSpec(num_experts=1, hidden_size=1, intermediate_size=gate.numel(), has_bias=False, **fields)
        if _matches(out, apply_activation(gate, up, probe_spec)):
            return fields
    layout = "interleaved" if interleaved else "concatenated"
    act_name = type(act).__name__ if isinstance(act, nn.Module) else getattr(act, "__name__", repr(act))
    raise OperatorError(
        f"{where}: its gate function (_apply_gate on {layout} gate/up, act_fn {act_name}) computes none of the known "
        f"activations ({', '.join([*GATED_ONLY, *ELEMENTWISE])}; limit={limit}, alpha={alpha}, softcaps={caps})"
    )


# ---- tensors ---------------------------------------------------------------------------------------


def weight_names(spec: ExpertsSpec) -> list[str]:
    """The experts' weight tensors (``state_dict`` names relative to the module); a post-expert norm's own
    tensors (``post_expert_norm.*``) come on top, from the norm module."""
    if spec.storage == "w1_v1_w2":
        return ["mlp.w1", "mlp.v1", "mlp.w2"]
    first = "gate_up_proj" if spec.gated else "up_proj"
    return [first, "down_proj"] + ([f"{first}_bias", "down_proj_bias"] if spec.has_bias else [])


def split_gate_up(gate_up: torch.Tensor, spec: ExpertsSpec, *, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a stacked gate_up tensor (weight ``[E, ., .]`` or bias ``[E, 2I]``) into canonical gate and up."""
    if not spec.gated:
        raise OperatorError("split_gate_up: these experts are not gated (there is only an up projection)")
    if gate_up.dim() == 3 and transposed:
        gate_up = gate_up.transpose(1, 2)  # -> [E, 2I, H]
    if spec.interleaved:  # gate at even, up at odd positions along the 2I axis
        return gate_up[:, 0::2].contiguous(), gate_up[:, 1::2].contiguous()
    inter = spec.intermediate_size
    return gate_up[:, :inter].contiguous(), gate_up[:, inter:].contiguous()


def canonical_from_tensors(tensors: Mapping[str, torch.Tensor], spec: ExpertsSpec) -> ExpertWeights:
    """Canonical weights from the module's tensors by ``weight_names`` (a live module's or a checkpoint's).

    Only the routed experts' rows are kept (identity experts own no weights)."""
    e, h, i = spec.num_experts, spec.hidden_size, spec.intermediate_size
    if spec.storage == "w1_v1_w2":  # flat [E*I, H]; w2 holds down transposed
        gate, up, down_t = (tensors[f"mlp.{n}"].reshape(e, i, h) for n in ("w1", "v1", "w2"))
        return ExpertWeights(gate=gate.contiguous(), up=up.contiguous(), down=down_t.transpose(1, 2).contiguous())
    first = "gate_up_proj" if spec.gated else "up_proj"
    stacked = tensors[first][:e]
    down = tensors["down_proj"]
    down = down.transpose(1, 2).contiguous() if spec.transposed else down.contiguous()
    if spec.gated:
        gate, up = split_gate_up(stacked, spec, transposed=spec.transposed)
    else:
        gate, up = None, (stacked.transpose(1, 2) if spec.transposed else stacked).contiguous()
    weights = ExpertWeights(gate=gate, up=up, down=down)
    if spec.has_bias:
        bias = tensors[f"{first}_bias"][:e]
        if spec.gated:
            weights.gate_bias, weights.up_bias = split_gate_up(bias, spec, transposed=spec.transposed)
        else:
            weights.up_bias = bias.contiguous()
        weights.down_bias = tensors["down_proj_bias"].contiguous()
    return weights


def canonical_weights(module: nn.Module, spec: ExpertsSpec) -> ExpertWeights:
    """Read ``module``'s tensors into the canonical orientation (copies; the module is left as is)."""
    state = module.state_dict(keep_vars=True)
    return canonical_from_tensors({n: state[n].detach() for n in weight_names(spec)}, spec)


def apply_activation(gate: torch.Tensor | None, up: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    """The experts' activation on the gate/up projections (``gate`` is None when not gated): the reference
    math the kernels must match."""
    act = spec.activation
    if not spec.gated:
        return ELEMENTWISE[act](up)
    if gate is None:
        raise OperatorError(f"apply_activation: gated activation {act!r} needs the gate projection")
    limit = spec.swiglu_limit
    if act == "gptoss_swiglu":
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * spec.swiglu_alpha))
    if act == "clamped_swiglu":
        return nn.functional.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)
    if act == "swiglu_clamp_after":
        return nn.functional.silu(gate).clamp(max=limit) * up.clamp(min=-limit, max=limit)
    if act == "softcapped_swiglu":
        g, u = gate.float(), up.float()  # in float32 like Inkling-2's own
        capped_gate = torch.tanh(g / spec.softcap_gate) * spec.softcap_gate
        capped_up = torch.tanh(u / spec.softcap_up) * spec.softcap_up
        return (capped_gate * torch.sigmoid(g) * capped_up).to(gate.dtype)
    return ELEMENTWISE[act](gate) * up


def validate_routing(
    hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, spec: ExpertsSpec, name: str
) -> None:
    """Shape checks shared by the experts operators (cheap attribute reads only; no device sync)."""
    if hidden.dim() != 2 or hidden.shape[1] != spec.hidden_size:
        raise OperatorError(f"{name}: hidden_states must be [tokens, {spec.hidden_size}], got {tuple(hidden.shape)}")
    if top_k_index.shape != top_k_weights.shape or top_k_index.dim() != 2 or top_k_index.shape[0] != hidden.shape[0]:
        raise OperatorError(
            f"{name}: top_k_index {tuple(top_k_index.shape)} and top_k_weights {tuple(top_k_weights.shape)} "
            f"must both be [tokens={hidden.shape[0]}, k]"
        )
