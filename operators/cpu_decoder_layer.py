"""``cpu_decoder_layer`` / ``decoder_layer``: a whole pre-norm MoE decoder layer (transformers' Llama-form layer
with a Qwen3-MoE-form sparse MoE block) in two C++ pool jobs per decoding step (csrc/layer).

With the attention, norms, router and experts each an operator, a decode step of a layer is still ~25 calls
from Python and 4 pool jobs, and the Python between the kernels runs on caches the kernels just flushed. Here:
job 1 = input RMSNorm + q/k/v + q/k norm + rotary; transformers' cache takes k, v (``cache.update``: any
Cache class, generate() unchanged); job 2 = attention + o_proj + residual + post RMSNorm + router + experts +
residual. The parts are the same operators (``self_attn`` is a ``cpu_attention``, ``mlp.gate`` a
``cpu_router``, ``mlp.experts`` a ``cpu_experts``...), so weights load and are named as in the transformers
layer. Calls with more than ``native_tokens`` new tokens (prefill) run the parts one by one, as transformers'
layer does, and so do calls while transformers records the routers' logits (``output_router_logits``); under
torch.compile the two jobs are custom ops (``ktinject::cpu_decoder_layer_pre``/``_post``). When the cache layer
is transformers' default ``DynamicLayer`` (generate()'s), a decode step is a single job: job 1, the new keys and
values written into buffers behind the cache layer's tensors (operators/kv_buffer.py), job 2.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
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
from ktinject.operators.cpu_norm import CpuRmsNorm, unsupported_rmsnorm
from ktinject.operators.cpu_pool import CpuOperator, CpuOrPlaced
from ktinject.operators.cpu_router import CpuRouter, CpuRouterConfig, router_normalizes
from ktinject.operators.cpu_weights import WeightTypeName, stored_part
from ktinject.operators.experts_layout import experts_spec, looks_like_experts
from ktinject.operators.kv_buffer import KvRoom, step_room
from ktinject.operators.module_forms import computes_like
from torch import nn

from ktinject.errors import OperatorError
from ktinject.native import native
from ktinject.operator import OperatorConfig, register_operator
from ktinject.output_capture import recording

_LAYER_TEMPLATES = ("transformers.models.qwen3_moe.modeling_qwen3_moe:Qwen3MoeDecoderLayer",)
_MOE_BLOCK_TEMPLATES = ("transformers.models.qwen3_moe.modeling_qwen3_moe:Qwen3MoeSparseMoeBlock",)
_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp.gate", "mlp.experts")


def unsupported_decoder_layer(module: nn.Module) -> str | None:
    """Why cpu_decoder_layer cannot replace ``module`` (None: it can). Attribute and source reads only."""
    if not computes_like(module, *_LAYER_TEMPLATES):
        return f"{type(module).__name__} is not a decoder layer of the Llama form"
    why = unsupported_attention(getattr(module, "self_attn", None))
    if why is not None:
        return f"its self_attn: {why}"
    for name in ("input_layernorm", "post_attention_layernorm"):
        why = unsupported_rmsnorm(getattr(module, name, None))
        if why is not None:
            return f"its {name}: {why}"
    mlp = getattr(module, "mlp", None)
    if not computes_like(mlp, *_MOE_BLOCK_TEMPLATES):
        return "its mlp is not a sparse MoE block of the Qwen3-MoE form (gate, then experts)"
    if router_normalizes(getattr(mlp, "gate", None)) is None:
        return "its mlp.gate is not a softmax top-k router"
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


@dataclasses.dataclass(frozen=True)
class CpuDecoderLayerConfig(CpuAttentionConfig):
    """weight_type (attention projections and router gate), experts_weight_type, threads, numa_nodes, isa,
    native_tokens (see cpu_attention; the same pool for every part)."""

    experts_weight_type: WeightTypeName = "auto"


class _MoeBlock(nn.Module):
    """Holds the router and experts operators under transformers' names (mlp.gate, mlp.experts)."""

    def __init__(self, gate: CpuRouter, experts: CpuExperts) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, weights, ids = self.gate(flat)
        return self.experts(flat, ids, weights).reshape(shape)


@register_operator("cpu_decoder_layer")
class CpuDecoderLayer(CpuOperator):
    """A pre-norm MoE decoder layer on the CPU (see the module docstring)."""

    Config = CpuDecoderLayerConfig
    wants_raw_weights = True
    yields_to_earlier_rules = True  # a user's rule for one of its parts (say the experts) wins

    def __init__(self, parts: dict[str, nn.Module], *, name: str, config: CpuDecoderLayerConfig) -> None:
        super().__init__()
        self.module_name = name
        self.config = config
        self.input_layernorm = parts["input_layernorm"]
        self.self_attn = parts["self_attn"]
        self.post_attention_layernorm = parts["post_attention_layernorm"]
        self.mlp = _MoeBlock(parts["mlp.gate"], parts["mlp.experts"])
        self._native: Any = None
        self._handle = torch_ops.register(self)
        s = self.self_attn.shape  # what step_room checks the cache layer against, read once
        self._cache_layout = (self.self_attn.layer_idx, s.kv_heads, s.head_dim)

    @classmethod
    def from_module(
        cls, module: nn.Module, *, name: str, device: torch.device, config: CpuDecoderLayerConfig
    ) -> "CpuDecoderLayer":
        cls.check_device(device, config)
        why = unsupported_decoder_layer(module)
        if why is not None:
            raise OperatorError(f"cpu_decoder_layer cannot replace {name!r}: {why}")
        parts = {
            key: op_class.from_module(module.get_submodule(key), name=f"{name}.{key}", device=device, config=cfg)
            for key, (op_class, cfg) in _part_classes(config).items()
        }
        op = cls(parts, name=name, config=config)
        if not module.self_attn.q_proj.weight.is_meta:
            op._build()
        return op

    @classmethod
    def estimate_bytes(cls, module: nn.Module, config: CpuDecoderLayerConfig) -> int:
        return sum(
            op_class.estimate_bytes(module.get_submodule(key), cfg)
            for key, (op_class, cfg) in _part_classes(config).items()
        )

    @classmethod
    def estimate_stored_bytes(
        cls, module: nn.Module, config: CpuDecoderLayerConfig, device: torch.device, stored
    ) -> int:
        total = 0
        for key, (op_class, cfg) in _part_classes(config).items():
            total += op_class.estimate_stored_bytes(module.get_submodule(key), cfg, device, stored_part(stored, key))
        return total

    def weight_names(self) -> list[str]:
        return [f"{key}.{w}" for key in _PARTS for w in self.get_submodule(key).weight_names()]

    def load_weights(self, source, prefix: str) -> None:
        for key in _PARTS:
            self.get_submodule(key).load_weights(source, f"{prefix}{key}.")
        self._build()

    def _build(self) -> None:
        norms = (self.input_layernorm, self.post_attention_layernorm)
        try:
            self._native = native().DecoderLayer(
                self.self_attn._native,
                self.mlp.gate._router,
                self.mlp.experts._moe,
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
        x = hidden_states if hidden_states.is_contiguous() else hidden_states.contiguous()
        cos, sin = rotary_row_arrays(*position_embeddings, B, T)
        mask = None if attention_mask is None else mask_rows(attention_mask, room.n_past + T, self.module_name)
        out = torch.empty_like(x)
        try:
            self._native.step(
                _array(x),
                cos,
                sin,
                room.buffers.keys_array,
                room.buffers.values_array,
                room.n_past,
                None if mask is None else mask.numpy(),
                _array(out),
            )
        except ValueError as exc:
            raise OperatorError(f"cpu_decoder_layer for {self.module_name!r}: {exc}") from None
        room.commit(T)
        return out

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


def _part_classes(config: CpuDecoderLayerConfig) -> dict[str, tuple[type, OperatorConfig]]:
    pool = {"threads": config.threads, "numa_nodes": config.numa_nodes, "isa": config.isa}
    return {
        "input_layernorm": (CpuRmsNorm, OperatorConfig()),
        "self_attn": (
            CpuAttention,
            CpuAttentionConfig(weight_type=config.weight_type, native_tokens=config.native_tokens, **pool),
        ),
        "post_attention_layernorm": (CpuRmsNorm, OperatorConfig()),
        "mlp.gate": (CpuRouter, CpuRouterConfig(**pool)),
        "mlp.experts": (CpuExperts, CpuExpertsConfig(weight_type=config.experts_weight_type, **pool)),
    }


@dataclasses.dataclass(frozen=True)
class DecoderLayerConfig(CpuDecoderLayerConfig):
    """As cpu_decoder_layer's; ignored off the CPU."""


@register_operator("decoder_layer")
class DecoderLayer(CpuOrPlaced):
    """``cpu_decoder_layer`` on the CPU; transformers' layer, placed, on any other device (its parts are then
    claimed by the other rules)."""

    Config = DecoderLayerConfig
    cpu_operator = CpuDecoderLayer
