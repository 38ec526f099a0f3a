"""``cpu_router`` / ``router``: a MoE layer's router in one pool job: the gate projection over its stored
weights, then per token the expert choice of one of two forms shared by ~30 transformers classes:

- softmax top-k (the Qwen3-MoE form: Qwen2/3-MoE, OLMoE, Qwen3-Next, Qwen3.5-MoE...; and Mixtral's, MiniMax's):
  softmax, top-k, optionally renormalized;
- grouped sigmoid (the DeepSeek-V3 form: DeepSeek-V3/V3.2, Kimi, GLM-4-MoE and GLM-5, dots.llm1, MiMo-V2,
  Nemotron-H...): sigmoid scores plus a correction bias choose, within the best groups of experts, the top-k;
  their scores (renormalized) times a scaling factor are the weights.

transformers' router is a float matrix-vector product through torch's one-thread path (the gate of a
128-expert layer is 1 MB in float32) and five (softmax) to fifteen (grouped) small ops; ours reads the gate on
every pool thread and does the rest in the same job. Returns what transformers' router returns: (logits, top-k
weights, top-k expert ids).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from ktinject.operators import torch_ops
from ktinject.operators.cpu_linear import CpuLinear, CpuLinearConfig
from ktinject.operators.cpu_pool import CpuOperator, CpuOrPlaced, CpuPoolConfig
from ktinject.operators.module_forms import computes_like
from torch import nn

from ktinject.errors import OperatorError
from ktinject.native import native
from ktinject.operator import register_operator
from ktinject.weights.source import ModuleSource

# softmax -> top-k -> renormalized when module.norm_topk_prob
_OPTIONAL_NORM = ("transformers.models.qwen3_moe.modeling_qwen3_moe:Qwen3MoeTopKRouter",)
# softmax -> top-k -> always renormalized
_ALWAYS_NORM = ("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe:Qwen3_5MoeTopKRouter",)
# softmax -> top-k -> always renormalized, the weights left in float32
_MIXTRAL = ("transformers.models.mixtral.modeling_mixtral:MixtralTopKRouter",)
# sigmoid + e_score_correction_bias -> best topk_group of num_group groups -> top-k -> (renormalized) * scale
_GROUPED_SIGMOID = ("transformers.models.deepseek_v3.modeling_deepseek_v3:DeepseekV3TopkRouter",)


@dataclasses.dataclass(frozen=True)
class RouterForm:
    """How a recognised router chooses experts (see the module docstring)."""

    score: str  # "softmax" or "sigmoid"
    normalize: bool
    groups: int = 1  # sigmoid: the experts' groups, of which topk_groups are searched
    topk_groups: int = 1
    scale: float = 1.0  # sigmoid: routed_scaling_factor
    has_bias: bool = False  # sigmoid: e_score_correction_bias
    float32_weights: bool = False  # the weights stay float32 (else: the logits' dtype, the input's)


def router_form(module: nn.Module) -> RouterForm | None:
    """The form of a router cpu_router computes (None: not one). Attribute and source reads only."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not isinstance(getattr(module, "top_k", None), int):
        return None
    if computes_like(module, *_ALWAYS_NORM):
        return RouterForm("softmax", True)
    if computes_like(module, *_MIXTRAL):
        return RouterForm("softmax", True, float32_weights=True)
    if computes_like(module, *_OPTIONAL_NORM) and hasattr(module, "norm_topk_prob"):
        return RouterForm("softmax", bool(module.norm_topk_prob))
    if computes_like(module, *_GROUPED_SIGMOID):
        groups, topk_groups = getattr(module, "num_group", None), getattr(module, "topk_group", None)
        bias = getattr(module, "e_score_correction_bias", None)
        scale = getattr(module, "routed_scaling_factor", None)
        if not (isinstance(groups, int) and isinstance(topk_groups, int) and isinstance(scale, (int, float))):
            return None
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            return None
        return RouterForm("sigmoid", bool(module.norm_topk_prob), groups, topk_groups, float(scale), True, True)
    return None


def router_normalizes(module: nn.Module) -> bool | None:
    """Whether a softmax top-k router renormalizes its top-k weights (None: not a router of that form)."""
    form = router_form(module)
    return form.normalize if form is not None and form.score == "softmax" else None


@dataclasses.dataclass(frozen=True)
class CpuRouterConfig(CpuPoolConfig):
    """weight_type (of the gate), threads, numa_nodes, isa (see CpuPoolConfig; the same pool as cpu_experts)."""


@register_operator("cpu_router")
class CpuRouter(CpuOperator):
    """Softmax or grouped-sigmoid top-k routing on the CPU's pool."""

    Config = CpuRouterConfig
    wants_raw_weights = True

    def __init__(self, experts: int, hidden: int, top_k: int, form: RouterForm, *, name: str, config: CpuRouterConfig):
        super().__init__()
        self.num_experts = experts
        self.hidden_dim = hidden
        self.top_k = top_k
        self.form = form
        self.norm_topk_prob = form.normalize
        self.module_name = name
        self.e_score_correction_bias: torch.Tensor | None = None  # float32, the sigmoid form's
        linear_config = CpuLinearConfig(**dataclasses.asdict(config))
        self.gate = CpuLinear(hidden, experts, False, name=name, config=linear_config)
        self._router: Any = None
        self._handle = torch_ops.register(self)

    @classmethod
    def from_module(cls, module: nn.Module, *, name: str, device: torch.device, config: CpuRouterConfig) -> "CpuRouter":
        cls.check_device(device, config)
        form = router_form(module)
        if form is None:
            raise OperatorError(
                f"cpu_router cannot replace {name!r}: {type(module).__name__} is not a softmax top-k router of the "
                "Qwen3-MoE form nor a grouped sigmoid router of the DeepSeek-V3 form"
            )
        experts, hidden = module.weight.shape
        op = cls(experts, hidden, module.top_k, form, name=name, config=config)
        op.gate._weight_stand_in = torch.empty(module.weight.shape, dtype=module.weight.dtype, device="meta")
        if not module.weight.is_meta:
            op.load_weights(ModuleSource(module, description=f"module {name!r}"), "")
        return op

    @classmethod
    def estimate_bytes(cls, module: nn.Module, config: CpuRouterConfig) -> int:
        return CpuLinear.estimate_bytes(module, CpuLinearConfig(**dataclasses.asdict(config)))

    @classmethod
    def estimate_stored_bytes(cls, module: nn.Module, config: CpuRouterConfig, device: torch.device, stored) -> int:
        return CpuLinear.estimate_stored_bytes(module, CpuLinearConfig(**dataclasses.asdict(config)), device, stored)

    def weight_names(self) -> list[str]:
        return ["weight", "e_score_correction_bias"] if self.form.has_bias else ["weight"]

    def load_weights(self, source, prefix: str) -> None:
        self.gate.load_weights(source, prefix)
        form, bias = self.form, None
        if form.has_bias:
            bias = source.tensor(prefix + "e_score_correction_bias", dtype=torch.float32).contiguous()
            if bias.shape != (self.num_experts,):
                raise OperatorError(
                    f"cpu_router for {self.module_name!r}: e_score_correction_bias has shape {list(bias.shape)}, "
                    f"expected [{self.num_experts}]"
                )
            self.e_score_correction_bias = bias
        try:
            self._router = native().Router(
                self.gate._linear,
                top_k=self.top_k,
                normalize=form.normalize,
                score=form.score,
                groups=form.groups,
                topk_groups=form.topk_groups,
                scale=form.scale,
                bias=None if bias is None else bias.numpy(),
            )
        except ValueError as exc:
            raise OperatorError(f"cpu_router for {self.module_name!r}: {exc}") from None

    @property
    def weight(self) -> torch.Tensor:
        """The gate's shape and dtype, holding no data (``meta``)."""
        return self.gate.weight

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, self.hidden_dim)
        if torch.compiler.is_compiling():
            logits, weights, ids = torch_ops.cpu_router(x, self._handle)
        else:
            logits, weights, ids = self.run(x)
        dtype = hidden_states.dtype
        if dtype is not torch.float32:  # as transformers' routers: the softmax form's logits in the input's dtype,
            if self.form.score == "softmax":  # the sigmoid form's in float32; the weights by form
                logits = logits.to(dtype)
            if not self.form.float32_weights:
                weights = weights.to(dtype)
        return logits, weights, ids

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> logits float32 [N, experts], weights float32 [N, top_k], ids int64 [N, top_k]."""
        if self._router is None:
            raise OperatorError(f"cpu_router for {self.module_name!r} has no weights yet (load_weights was not called)")
        if x.dtype is not torch.float32 or x.device.type != "cpu" or x.requires_grad:
            if x.is_meta:
                raise OperatorError(f"cpu_router for {self.module_name!r}: the input is on the meta device (no data)")
            x = x.detach().to(device="cpu", dtype=torch.float32)
        if not x.is_contiguous():
            x = x.contiguous()
        n = x.shape[0]
        logits = torch.empty(n, self.num_experts)
        weights = torch.empty(n, self.top_k)
        ids = torch.empty(n, self.top_k, dtype=torch.int64)
        try:
            self._router.route(x.numpy(), logits.numpy(), weights.numpy(), ids.numpy())
        except ValueError as exc:
            raise OperatorError(f"cpu_router for {self.module_name!r}: {exc}") from None
        return logits, weights, ids

    def extra_repr(self) -> str:
        f = self.form
        grouped = f", groups={f.groups}, topk_groups={f.topk_groups}, scale={f.scale}" if f.score == "sigmoid" else ""
        return f"experts={self.num_experts}, top_k={self.top_k}, score={f.score}, normalize={f.normalize}{grouped}"


@dataclasses.dataclass(frozen=True)
class RouterConfig(CpuRouterConfig):
    """As cpu_router's; ignored off the CPU."""


@register_operator("router")
class Router(CpuOrPlaced):
    """``cpu_router`` on the CPU; transformers' router, placed, on any other device."""

    Config = RouterConfig
    cpu_operator = CpuRouter
