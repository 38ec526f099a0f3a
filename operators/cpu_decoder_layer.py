"""``cpu_decoder_layer`` / ``decoder_layer``: a whole pre-norm decoder layer (transformers' Llama-form layer with
standard attention) in C++ pool jobs (csrc/layer). After the attention comes one of
- a sparse MoE block of the Qwen3-MoE or Mixtral form (router, routed experts: Qwen3-MoE, Qwen3-VL-MoE, Mixtral,
  MiniMax...),
- a MoE block of the DeepSeek-V3 form (router, routed experts, plus shared experts: GLM-4-MoE, dots.llm1...),
- a MoE block of the Qwen2-MoE form (router, routed experts, plus a shared expert scaled by a sigmoid gate),
- a SiLU-gated MLP of the Llama form (the dense layers of those models).

With the attention, norms, router and experts each an operator, a decode step of a layer is still ~25 calls
from Python and 4 pool jobs, and the Python between the kernels runs on caches the kernels just flushed. Here:
job 1 = input RMSNorm + q/k/v + q/k norm + rotary; transformers' cache takes k, v (``cache.update``: any
Cache class, generate() unchanged); job 2 = attention + o_proj + residual + post RMSNorm + the block above +
residual. The parts are the same operators (``self_attn`` is a ``cpu_attention``, ``mlp.gate`` a
``cpu_router``, ``mlp.experts`` a ``cpu_experts``, the MLP projections ``cpu_linear``...), so weights load and
are named as in the transformers layer. Calls with more than ``native_tokens`` new tokens (prefill) run the parts one by one, as transformers'
layer does, and so do calls while transformers records the routers' logits (``output_router_logits``); under
torch.compile the two jobs are custom ops (``ktinject::cpu_decoder_layer_pre``/``_post``). When the cache layer
is transformers' default ``DynamicLayer`` (generate()'s), a decode step is a single job: job 1, the new keys and
values written into buffers behind the cache layer's tensors (operators/kv_buffer.py), job 2.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from ktinject.operators import torch_ops
from ktinject.operators.attention_layout import unsupported_attention
from ktinject.operators.cpu_attention import (
    CpuAttention,
    CpuAttentionConfig,
    _f32,
    _kv_array,
    mask_rows,
    rotary_row_arrays,
    rotary_rows,
)
from ktinject.operators.cpu_experts import SUPPORTED_FEATURES, CpuExperts, CpuExpertsConfig
from ktinject.operators.cpu_linear import CpuLinear, CpuLinearConfig
from ktinject.operators.cpu_norm import CpuRmsNorm, unsupported_rmsnorm
from ktinject.operators.cpu_pool import CpuOperator, CpuOrPlaced
from ktinject.operators.cpu_router import CpuRouter, CpuRouterConfig, router_form
from ktinject.operators.cpu_weights import WeightTypeName, stored_part
from ktinject.operators.experts_layout import experts_spec, looks_like_experts
from ktinject.operators.kv_buffer import KvRoom, step_room
from ktinject.operators.module_forms import computes_like
from torch import nn

from ktinject.errors import OperatorError
from ktinject.native import native
from ktinject.operator import OperatorConfig, register_operator
from ktinject.output_capture import recording

# norm, attention, residual, norm, mlp, residual (Mixtral's passes position_ids on to its attention as well)
_LAYER_TEMPLATES = (
    "transformers.models.qwen3_moe.modeling_qwen3_moe:Qwen3MoeDecoderLayer",
    "transformers.models.mixtral.modeling_mixtral:MixtralDecoderLayer",
)
# gate (router), then the routed experts (Mixtral's: with jitter noise in training only)
_ROUTED_BLOCK = (
    "transformers.models.qwen3_moe.modeling_qwen3_moe:Qwen3MoeSparseMoeBlock",
    "transformers.models.mixtral.modeling_mixtral:MixtralSparseMoeBlock",
)
# gate, the routed experts, plus shared_experts (a gated MLP) of the block's input
_SHARED_BLOCK = ("transformers.models.deepseek_v3.modeling_deepseek_v3:DeepseekV3MoE",)
# shared_expert (a gated MLP) scaled by sigmoid(shared_expert_gate), gate, the routed experts
_GATED_SHARED_BLOCK = ("transformers.models.qwen2_moe.modeling_qwen2_moe:Qwen2MoeSparseMoeBlock",)
# down_proj(act_fn(gate_proj(x)) * up_proj(x))
_MLP = ("transformers.models.llama.modeling_llama:LlamaMLP",)
_ATTENTION_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm")
_ROUTED_PARTS = ("mlp.gate", "mlp.experts")
_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LayerForm:
    """What follows a layer's attention: routed experts (``mlp.gate`` + ``mlp.experts``), a SiLU-gated MLP
    (its projections under ``mlp_prefix``: the MoE block's shared experts or a dense layer's MLP), or both; with
    ``shared_gate``, the MLP's output is scaled by the sigmoid of ``mlp.shared_expert_gate`` (Qwen2-MoE)."""

    routed: bool
    mlp_prefix: str | None  # "mlp.shared_experts.", "mlp.shared_expert." or "mlp.", None without an MLP
    shared_gate: bool = False

    @property
    def parts(self) -> tuple[str, ...]:
        mlp = tuple(self.mlp_prefix + p for p in _MLP_PROJECTIONS) if self.mlp_prefix else ()
        gate = ("mlp.shared_expert_gate",) if self.shared_gate else ()
        return _ATTENTION_PARTS + (_ROUTED_PARTS if self.routed else ()) + mlp + gate


def unsupported_decoder_layer(module: nn.Module) -> str | None:
    """Why cpu_decoder_layer cannot replace ``module`` (None: it can). Attribute and source reads only."""
    return _layer_form(module)[1]


def decoder_layer_form(module: nn.Module) -> LayerForm:
    """The form of a layer cpu_decoder_layer can replace (OperatorError naming why not otherwise)."""
    form, why = _layer_form(module)
    if form is None:
        raise OperatorError(f"cpu_decoder_layer cannot replace {type(module).__name__}: {why}")
    return form


def _layer_form(module: nn.Module) -> tuple[LayerForm | None, str | None]:
    if not computes_like(module, *_LAYER_TEMPLATES):
        return None, f"{type(module).__name__} is not a decoder layer of the Llama form"
    why = unsupported_attention(getattr(module, "self_attn", None))
    if why is not None:
        return None, f"its self_attn: {why}"
    for name in ("input_layernorm", "post_attention_layernorm"):
        why = unsupported_rmsnorm(getattr(module, name, None))
        if why is not None:
            return None, f"its {name}: {why}"
    mlp = getattr(module, "mlp", None)
    if computes_like(mlp, *_MLP):
        why = _unsupported_mlp(mlp)
        return (None, f"its mlp: {why}") if why else (LayerForm(False, "mlp."), None)
    if computes_like(mlp, *_SHARED_BLOCK):
        form = LayerForm(True, "mlp.shared_experts.")
    elif computes_like(mlp, *_GATED_SHARED_BLOCK):
        form = LayerForm(True, "mlp.shared_expert.", shared_gate=True)
    elif computes_like(mlp, *_ROUTED_BLOCK):
        form = LayerForm(True, None)
    else:
        return None, (
            "its mlp is neither a sparse MoE block of the Qwen3-MoE form (gate, then experts), the DeepSeek-V3 form "
            "(plus shared experts) or the Qwen2-MoE form (plus a gated shared expert) nor a gated MLP of the Llama form"
        )
    why = _unsupported_routed(mlp)
    if why is None and form.mlp_prefix:
        name = form.mlp_prefix[len("mlp.") : -1]
        why = _unsupported_mlp(getattr(mlp, name, None))
        why = None if why is None else f"its mlp.{name}: {why}"
    if why is None and form.shared_gate:
        gate = getattr(mlp, "shared_expert_gate", None)
        if not isinstance(gate, nn.Linear) or type(gate).forward is not nn.Linear.forward or gate.out_features != 1:
            why = "its mlp.shared_expert_gate is not an nn.Linear to one feature"
    return (None, why) if why is not None else (form, None)


def _unsupported_routed(mlp: nn.Module) -> str | None:
    if router_form(getattr(mlp, "gate", None)) is None:
        return "its mlp.gate is not a router cpu_router computes"
    experts = getattr(mlp, "experts", None)
    if not looks_like_experts(experts):
        return "its mlp.experts is not an experts module"
    try:
        spec = experts_spec(experts, supports=SUPPORTED_FEATURES)
    except OperatorError as exc:
        return f"its mlp.experts: {exc}"
    if spec.call != "routed" or spec.identity_experts or spec.post_expert_norm or spec.hidden_3d:
        return "its experts need more than a routed call (identity experts, a post-expert norm, 3-D inputs)"
    if mlp.gate.weight.shape[0] != spec.num_experts:
        return "its router and experts disagree on the number of experts"
    return None


def _unsupported_mlp(mlp: nn.Module | None) -> str | None:
    if not computes_like(mlp, *_MLP):
        return "not a gated MLP of the Llama form"
    if type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLUActivation", "SiLU"):
        return f"its activation is {type(getattr(mlp, 'act_fn', None)).__name__}, not SiLU"
    for name in _MLP_PROJECTIONS:
        proj = getattr(mlp, name, None)
        if not isinstance(proj, nn.Linear) or type(proj).forward is not nn.Linear.forward:
            return f"its {name} is not an nn.Linear"
    return None


@dataclasses.dataclass(frozen=True)
class CpuDecoderLayerConfig(CpuAttentionConfig):
    """weight_type (attention projections and router gate), experts_weight_type, threads, numa_nodes, isa,
    native_tokens (see cpu_attention; the same pool for every part)."""

    experts_weight_type: WeightTypeName = "auto"


class _Mlp(nn.Module):
    """A SiLU-gated MLP of cpu_linear projections under transformers' names (gate_proj, up_proj, down_proj)."""

    def __init__(self, gate_proj: CpuLinear, up_proj: CpuLinear, down_proj: CpuLinear) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _MoeBlock(nn.Module):
    """Holds the router, experts (and shared experts, and their gate) operators under transformers' names
    (mlp.gate, mlp.experts, mlp.shared_experts or mlp.shared_expert + mlp.shared_expert_gate) and computes as
    transformers' block does."""

    def __init__(
        self,
        gate: CpuRouter,
        experts: CpuExperts,
        shared: _Mlp | None = None,
        shared_name: str = "shared_experts",
        shared_gate: CpuLinear | None = None,
    ) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts
        self._shared_name = shared_name
        if shared is not None:
            self.add_module(shared_name, shared)
        if shared_gate is not None:
            self.shared_expert_gate = shared_gate

    def shared(self) -> _Mlp | None:
        """The shared experts' MLP under its transformers name (``shared_experts`` or ``shared_expert``), if any."""
        return self._modules.get(self._shared_name)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, weights, ids = self.gate(flat)
        out = self.experts(flat, ids, weights).reshape(shape)
        shared = self.shared()
        if shared is None:
            return out
        if "shared_expert_gate" in self._modules:  # Qwen2-MoE: sigmoid-gated, computed on the flat rows
            return out + (F.sigmoid(self.shared_expert_gate(flat)) * shared(flat)).reshape(shape)
        return out + shared(hidden_states)


@register_operator("cpu_decoder_layer")
class CpuDecoderLayer(CpuOperator):
    """A pre-norm MoE decoder layer on the CPU (see the module docstring)."""

    Config = CpuDecoderLayerConfig
    wants_raw_weights = True
    yields_to_earlier_rules = True  # a user's rule for one of its parts (say the experts) wins

    def __init__(
        self, parts: dict[str, nn.Module], form: LayerForm, *, name: str, config: CpuDecoderLayerConfig
    ) -> None:
        super().__init__()
        self.module_name = name
        self.config = config
        self.form = form
        self.input_layernorm = parts["input_layernorm"]
        self.self_attn = parts["self_attn"]
        self.post_attention_layernorm = parts["post_attention_layernorm"]
        p = form.mlp_prefix
        mlp = _Mlp(*(parts[p + name] for name in _MLP_PROJECTIONS)) if p else None
        if form.routed:
            shared_name = p[len("mlp.") : -1] if p else "shared_experts"
            shared_gate = parts["mlp.shared_expert_gate"] if form.shared_gate else None
            self.mlp = _MoeBlock(parts["mlp.gate"], parts["mlp.experts"], mlp, shared_name, shared_gate)
        else:
            self.mlp = mlp
        self._native: Any = None
        self._handle = torch_ops.register(self)
        s = self.self_attn.shape  # what step_room checks the cache layer against, read once
        self._cache_layout = (self.self_attn.layer_idx, s.kv_heads, s.head_dim)

    @classmethod
    def from_module(
        cls, module: nn.Module, *, name: str, device: torch.device, config: CpuDecoderLayerConfig
    ) -> "CpuDecoderLayer":
        cls.check_device(device, config)
        form, why = _layer_form(module)
        if form is None:
            raise OperatorError(f"cpu_decoder_layer cannot replace {name!r}: {why}")
        parts = {
            key: op_class.from_module(module.get_submodule(key), name=f"{name}.{key}", device=device, config=cfg)
            for key, (op_class, cfg) in _part_classes(config, form).items()
        }
        op = cls(parts, form, name=name, config=config)
        if not module.self_attn.q_proj.weight.is_meta:
            op._build()
        return op

    @classmethod
    def estimate_bytes(cls, module: nn.Module, config: CpuDecoderLayerConfig) -> int:
        return sum(
            op_class.estimate_bytes(module.get_submodule(key), cfg)
            for key, (op_class, cfg) in _part_classes(config, decoder_layer_form(module)).items()
        )

    @classmethod
    def estimate_stored_bytes(
        cls, module: nn.Module, config: CpuDecoderLayerConfig, device: torch.device, stored
    ) -> int:
        total = 0
        for key, (op_class, cfg) in _part_classes(config, decoder_layer_form(module)).items():
            total += op_class.estimate_stored_bytes(module.get_submodule(key), cfg, device, stored_part(stored, key))
        return total

    def weight_names(self) -> list[str]:
        return [f"{key}.{w}" for key in self.form.parts for w in self.get_submodule(key).weight_names()]

    def load_weights(self, source, prefix: str) -> None:
        for key in self.form.parts:
            self.get_submodule(key).load_weights(source, f"{prefix}{key}.")
        self._build()

    def _build(self) -> None:
        norms = (self.input_layernorm, self.post_attention_layernorm)
        form = self.form
        mlp = self.mlp.shared() if form.routed else self.mlp
        try:
            self._native = native().DecoderLayer(
                self.self_attn._native,
                self.mlp.gate._router if form.routed else None,
                self.mlp.experts._moe if form.routed else None,
                mlp_gate=mlp.gate_proj._linear if mlp is not None else None,
                mlp_up=mlp.up_proj._linear if mlp is not None else None,
                mlp_down=mlp.down_proj._linear if mlp is not None else None,
                mlp_shared_gate=self.mlp.shared_expert_gate._linear if form.shared_gate else None,
                input_norm=norms[0]._weight_array,
                input_eps=norms[0].variance_epsilon,
                post_norm=norms[1]._weight_array,
                post_eps=norms[1].variance_epsilon,
            )
        except ValueError as exc:
            raise OperatorError(f"cpu_decoder_layer for {self.module_name!r}: {exc}") from None

    # ---- running ----------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """transformers' decoder layer forward: returns the new hidden states."""
        cache = cache if cache is not None else past_key_values
        if self._native is None:
            raise OperatorError(f"cpu_decoder_layer for {self.module_name!r} has no weights yet")
        if (
            hidden_states.dim() != 3
            or hidden_states.shape[1] > self.config.native_tokens
            or position_embeddings is None
            or (not torch.compiler.is_compiling() and recording("router_logits"))  # the router must be seen
        ):
            return self._forward_parts(hidden_states, attention_mask, cache, position_embeddings, kwargs)
        if cache is not None and not torch.compiler.is_compiling():
            room = step_room(cache, *self._cache_layout, hidden_states)
            if room is not None:
                return self._forward_step(hidden_states, attention_mask, room, position_embeddings)
        return self._forward_fused(hidden_states, attention_mask, cache, position_embeddings, kwargs)

    def _forward_step(self, hidden_states, attention_mask, room: KvRoom, position_embeddings) -> torch.Tensor:
        """The whole layer in one C++ job that also appends the new keys/values to transformers' cache layer
        (operators/kv_buffer.py)."""
        B, T, _ = hidden_states.shape
        x = _stream(hidden_states)  # detached, contiguous float32 or bfloat16
        cos, sin = rotary_row_arrays(*position_embeddings, B, T)
        mask = None if attention_mask is None else mask_rows(attention_mask, room.n_past + T, self.module_name)
        out = torch.empty_like(x)
        try:
            room.step(self._native.step, _array(x), cos, sin, None if mask is None else mask.numpy(), _array(out), T)
        except ValueError as exc:
            raise OperatorError(f"cpu_decoder_layer for {self.module_name!r}: {exc}") from None
        return out if out.dtype is hidden_states.dtype else out.to(hidden_states.dtype)

    def _forward_parts(self, x, attention_mask, cache, position_embeddings, kwargs) -> torch.Tensor:
        """The layer as transformers runs it, part by part (prefill)."""
        h = self.input_layernorm(x)
        h, _ = self.self_attn(
            h, position_embeddings=position_embeddings, attention_mask=attention_mask, cache=cache, **kwargs
        )
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))

    def _forward_fused(self, hidden_states, attention_mask, cache, position_embeddings, kwargs) -> torch.Tensor:
        s = self.self_attn.shape
        dtype = hidden_states.dtype
        B, T, H = hidden_states.shape
        x = _stream(hidden_states)  # float32 or bfloat16: the C++ side converts, Python does not
        cos, sin = rotary_rows(*position_embeddings, B, T)
        compiling = torch.compiler.is_compiling()
        if compiling:  # opaque nodes for dynamo
            q, k, v = torch_ops.cpu_decoder_layer_pre(x.view(B * T, H), cos, sin, self._handle)
        else:
            q, k, v = self._pre(x.view(B * T, H), cos, sin)
        k = k.view(B, T, s.kv_heads, s.head_dim).transpose(1, 2)
        v = v.view(B, T, s.kv_heads, s.head_dim).transpose(1, 2)
        if k.dtype != dtype:
            k, v = k.to(dtype), v.to(dtype)
        if cache is not None:
            k, v = self.self_attn.update_cache(cache, k, v, cos, sin, kwargs)
        mask = mask_rows(attention_mask, k.shape[-2], self.module_name)
        q = q.view(B, T, -1)
        if compiling:
            out = torch_ops.cpu_decoder_layer_post(q, k, v, mask, x, self._handle)
        else:
            out = self._post(q, k, v, mask, x)
        return out if out.dtype == dtype else out.to(dtype)

    def run_pre(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [N, hidden] (float32 or bfloat16) -> q float32, k, v in x's dtype, of the normed x (the custom op)."""
        return self._pre(_stream(x), _f32(cos), _f32(sin))

    def run_post(self, q, keys, values, mask, x) -> torch.Tensor:
        """q [B, T, heads*head_dim], the cache, mask rows, x [B, T, hidden] -> the layer's output in x's dtype (the
        custom op)."""
        return self._post(_f32(q), keys, values, mask, _stream(x))

    # The calls behind run_pre / run_post on inputs already in the form the binding reads (contiguous float32 or
    # bfloat16 CPU tensors): at one token the checks cost as much as a kernel's hand-over, so the decoding step
    # makes them once.
    def _pre(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        s = self.self_attn.shape
        q = torch.empty(x.shape[0], s.heads * s.head_dim)
        k = torch.empty(x.shape[0], s.kv_heads * s.head_dim, dtype=x.dtype)
        v = torch.empty(x.shape[0], s.kv_heads * s.head_dim, dtype=x.dtype)
        try:
            self._native.pre(_array(x), cos.numpy(), sin.numpy(), q.numpy(), _array(k), _array(v))
        except ValueError as exc:
            raise OperatorError(f"cpu_decoder_layer for {self.module_name!r}: {exc}") from None
        return q, k, v

    def _post(self, q, keys, values, mask, x) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=x.dtype)
        try:
            self._native.post(
                q.numpy(),
                _kv_array(keys),
                _kv_array(values),
                None if mask is None else mask.numpy(),
                _array(x),
                _array(out),
            )
        except ValueError as exc:
            raise OperatorError(f"cpu_decoder_layer for {self.module_name!r}: {exc}") from None
        return out

    def extra_repr(self) -> str:
        return f"native_tokens={self.config.native_tokens}"


def _stream(t: torch.Tensor) -> torch.Tensor:
    """The residual stream as the C++ side reads it: a contiguous CPU float32 or bfloat16 tensor."""
    if t.dtype is torch.bfloat16 and t.device.type == "cpu" and not t.requires_grad:
        return t if t.is_contiguous() else t.contiguous()
    return _f32(t)


def _array(t: torch.Tensor):
    """numpy view: float32 as is, bfloat16 as its int16 bits."""
    return t.numpy() if t.dtype is torch.float32 else t.view(torch.int16).numpy()


def _part_classes(config: CpuDecoderLayerConfig, form: LayerForm) -> dict[str, tuple[type, OperatorConfig]]:
    pool = {"threads": config.threads, "numa_nodes": config.numa_nodes, "isa": config.isa}
    classes: dict[str, tuple[type, OperatorConfig]] = {
        "input_layernorm": (CpuRmsNorm, OperatorConfig()),
        "self_attn": (
            CpuAttention,
            CpuAttentionConfig(weight_type=config.weight_type, native_tokens=config.native_tokens, **pool),
        ),
        "post_attention_layernorm": (CpuRmsNorm, OperatorConfig()),
    }
    if form.routed:
        classes["mlp.gate"] = (CpuRouter, CpuRouterConfig(**pool))
        classes["mlp.experts"] = (CpuExperts, CpuExpertsConfig(weight_type=config.experts_weight_type, **pool))
    if form.mlp_prefix:
        for name in _MLP_PROJECTIONS:
            classes[form.mlp_prefix + name] = (CpuLinear, CpuLinearConfig(weight_type=config.weight_type, **pool))
    if form.shared_gate:
        classes["mlp.shared_expert_gate"] = (CpuLinear, CpuLinearConfig(weight_type=config.weight_type, **pool))
    return classes


@dataclasses.dataclass(frozen=True)
class DecoderLayerConfig(CpuDecoderLayerConfig):
    """As cpu_decoder_layer's; ignored off the CPU."""


@register_operator("decoder_layer")
class DecoderLayer(CpuOrPlaced):
    """``cpu_decoder_layer`` on the CPU; transformers' layer, placed, on any other device (its parts are then
    claimed by the other rules)."""

    Config = DecoderLayerConfig
    cpu_operator = CpuDecoderLayer
