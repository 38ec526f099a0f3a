"""``cpu_attention``: a transformers self-attention module on the CPU in our C++ kernels (csrc/attention).

At one token a layer's attention is a few dozen small torch ops (views, norms, rotary, cache concatenation,
repeat, sdpa, reshapes) around four projections, and on a CPU those ops cost more than the arithmetic. Here
the q/k/v projections, the per-head q/k norm and the rotary embedding are one pool job, transformers' own
cache takes the new keys and values (``cache.update``: any Cache class, generate() unchanged), and the
attention with the o_proj is a second job. When the cache layer is transformers' default ``DynamicLayer``, the
three are one job that writes the new keys and values into buffers behind the layer's tensors
(operators/kv_buffer.py). The projections are ``cpu_linear`` layers over the stored weights.

Calls with more than ``native_tokens`` new tokens (prefill) attend in torch's scaled_dot_product_attention,
whose matrix products beat a per-query loop there; the projections still run in our kernels.

Thread-safe: calls from several threads run one after the other on the pool.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ktinject.operators import torch_ops
from ktinject.operators.attention_layout import AttentionShape, attention_shape, unsupported_attention
from ktinject.operators.cpu_linear import CpuLinear, CpuLinearConfig
from ktinject.operators.cpu_pool import CpuOperator, CpuPoolConfig
from ktinject.operators.cpu_weights import stored_part
from ktinject.operators.kv_buffer import KvRoom, step_room
from torch import nn

from ktinject.errors import OperatorError
from ktinject.native import native
from ktinject.operator import check_int, register_operator

logger = logging.getLogger("ktinject")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class CpuAttentionConfig(CpuPoolConfig):
    """weight_type (of the four projections), threads, numa_nodes, isa (see CpuPoolConfig), and:

    native_tokens: calls with at most this many new tokens per sequence attend in our kernels, longer ones
    (prefill) in torch's scaled_dot_product_attention.
    """

    native_tokens: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("native_tokens", self.native_tokens, 0, 1 << 20, "")


@register_operator("cpu_attention")
class CpuAttention(CpuOperator):
    """Standard grouped-query attention (see attention_layout) with its projections, on the CPU."""

    Config = CpuAttentionConfig
    wants_raw_weights = True  # the projections take GGUF blocks as stored

    def __init__(
        self,
        shape: AttentionShape,
        projections: dict[str, CpuLinear],
        *,
        name: str,
        new_cache_api: bool,
        config: CpuAttentionConfig,
    ) -> None:
        super().__init__()
        self.shape = shape
        self.layer_idx = shape.layer_idx  # what transformers code reads from an attention module
        self.module_name = name
        self.config = config
        for key in _PROJECTIONS:
            setattr(self, key, projections[key])
        self._norms: dict[str, np.ndarray] = {}
        self._new_cache_api = new_cache_api
        self._native: Any = None
        self._handle = torch_ops.register(self)

    # ---- building ---------------------------------------------------------------------------------

    @classmethod
    def from_module(
        cls, module: nn.Module, *, name: str, device: torch.device, config: CpuAttentionConfig
    ) -> "CpuAttention":
        cls.check_device(device, config)
        why = unsupported_attention(module)
        if why is not None:
            raise OperatorError(f"cpu_attention cannot replace {name!r}: {why}")
        shape = attention_shape(module)
        linear_config = _linear_config(config)
        projections = {
            key: CpuLinear.from_module(getattr(module, key), name=f"{name}.{key}", device=device, config=linear_config)
            for key in _PROJECTIONS
        }
        params = inspect.signature(type(module).forward).parameters
        op = cls(shape, projections, name=name, new_cache_api="cache" in params, config=config)
        if not module.q_proj.weight.is_meta:
            if shape.qk_norm:
                for key in ("q_norm", "k_norm"):
                    op._norms[key] = _float_array(getattr(module, key).weight)
            op._build()
        return op

    @classmethod
    def estimate_bytes(cls, module: nn.Module, config: CpuAttentionConfig) -> int:
        linear_config = _linear_config(config)
        total = sum(CpuLinear.estimate_bytes(getattr(module, key), linear_config) for key in _PROJECTIONS)
        return total + sum(getattr(module, k).weight.numel() * 4 for k in ("q_norm", "k_norm") if hasattr(module, k))

    @classmethod
    def estimate_stored_bytes(cls, module: nn.Module, config: CpuAttentionConfig, device: torch.device, stored) -> int:
        linear_config = _linear_config(config)
        total = 0
        for key in _PROJECTIONS:
            total += CpuLinear.estimate_stored_bytes(
                getattr(module, key), linear_config, device, stored_part(stored, key)
            )
        return total + sum(getattr(module, k).weight.numel() * 4 for k in ("q_norm", "k_norm") if hasattr(module, k))

    def weight_names(self) -> list[str]:
        names = [f"{key}.{w}" for key in _PROJECTIONS for w in getattr(self, key).weight_names()]
        return names + (["q_norm.weight", "k_norm.weight"] if self.shape.qk_norm else [])

    def load_weights(self, source, prefix: str) -> None:
        for key in _PROJECTIONS:
            getattr(self, key).load_weights(source, f"{prefix}{key}.")
        if self.shape.qk_norm:
            for key in ("q_norm", "k_norm"):
                self._norms[key] = _float_array(source.tensor(f"{prefix}{key}.weight", dtype=torch.float32))
        self._build()

    def _build(self) -> None:
        s = self.shape
        try:
            self._native = native().Attention(
                *(getattr(self, key)._linear for key in _PROJECTIONS),
                hidden=s.hidden,
                heads=s.heads,
                kv_heads=s.kv_heads,
                head_dim=s.head_dim,
                scale=s.scale,
                q_norm=self._norms.get("q_norm"),
                k_norm=self._norms.get("k_norm"),
                norm_eps=s.norm_eps,
            )
        except ValueError as exc:
            raise OperatorError(f"cpu_attention for {self.module_name!r}: {exc}") from None

    # ---- running ----------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """transformers' attention forward: returns (attention output, None: no attention weights)."""
        if self._native is None:
            raise OperatorError(
                f"cpu_attention for {self.module_name!r} has no weights yet (load_weights was not called)"
            )
        if position_embeddings is None:
            raise OperatorError(
                f"cpu_attention for {self.module_name!r}: called without position_embeddings (cos, sin)"
            )
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.shape.hidden:
            raise OperatorError(
                f"cpu_attention for {self.module_name!r}: expected hidden_states [batch, tokens, {self.shape.hidden}], "
                f"got {list(hidden_states.shape)}"
            )
        cache = cache if cache is not None else past_key_values
        dtype = hidden_states.dtype
        B, T, _ = hidden_states.shape
        s = self.shape
        if cache is not None and T <= self.config.native_tokens and not torch.compiler.is_compiling():
            room = step_room(cache, self.layer_idx, s.kv_heads, s.head_dim, hidden_states)
            if room is not None:
                return self._forward_step(hidden_states, position_embeddings, attention_mask, room), None
        cos, sin = position_embeddings
        x = hidden_states.reshape(B * T, s.hidden)
        cos, sin = rotary_rows(cos, sin, B, T)
        compiling = torch.compiler.is_compiling()
        if compiling:
            q, k, v = torch_ops.cpu_attention_project(x, cos, sin, self._handle)
        else:
            q, k, v = self.run_project(x, cos, sin)
        k = k.view(B, T, s.kv_heads, s.head_dim).transpose(1, 2)
        v = v.view(B, T, s.kv_heads, s.head_dim).transpose(1, 2)
        if dtype != torch.float32:
            k, v = k.to(dtype), v.to(dtype)
        if cache is not None:
            k, v = self.update_cache(cache, k, v, cos, sin, kwargs)
        mask = mask_rows(attention_mask, k.shape[-2], self.module_name)
        q = q.view(B, T, s.heads * s.head_dim)
        if T > self.config.native_tokens:
            out = self._attend_torch(q, k, v, mask)
        elif compiling:
            out = torch_ops.cpu_attention_attend(q, k, v, mask, self._handle)
        else:
            out = self.run_attend(q, k, v, mask)
        return (out if dtype == torch.float32 else out.to(dtype)), None

    def _forward_step(self, hidden_states, position_embeddings, attention_mask, room: KvRoom) -> torch.Tensor:
        """Project, append to transformers' cache layer's buffers (operators/kv_buffer.py) and attend: one job."""
        B, T, _ = hidden_states.shape
        x = _f32(hidden_states)
        cos, sin = rotary_row_arrays(*position_embeddings, B, T)
        mask = None if attention_mask is None else mask_rows(attention_mask, room.n_past + T, self.module_name)
        out = torch.empty(B, T, self.shape.hidden)
        try:
            room.step(self._native.step, x.numpy(), cos, sin, None if mask is None else mask.numpy(), out.numpy(), T)
        except ValueError as exc:
            raise OperatorError(f"cpu_attention for {self.module_name!r}: {exc}") from None
        return out if hidden_states.dtype is torch.float32 else out.to(hidden_states.dtype)

    def update_cache(self, cache: Any, k: torch.Tensor, v: torch.Tensor, cos, sin, kwargs: dict):
        """Hand the new keys and values to transformers' cache as the replaced module did; returns all of them."""
        if self._new_cache_api:
            return cache.update(k, v, self.layer_idx, kwargs=kwargs)
        cache_kwargs = {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")}
        return cache.update(k, v, self.layer_idx, cache_kwargs)

    def run_project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x float32 [N, hidden] -> q [N, heads*head_dim], k, v [N, kv_heads*head_dim] (normed, rotated)."""
        s = self.shape
        x = _f32(x)
        q = torch.empty(x.shape[0], s.heads * s.head_dim)
        k = torch.empty(x.shape[0], s.kv_heads * s.head_dim)
        v = torch.empty(x.shape[0], s.kv_heads * s.head_dim)
        try:
            self._native.project(x.numpy(), _f32(cos).numpy(), _f32(sin).numpy(), q.numpy(), k.numpy(), v.numpy())
        except ValueError as exc:
            raise OperatorError(f"cpu_attention for {self.module_name!r}: {exc}") from None
        return q, k, v

    def run_attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None):
        """q float32 [B, T, heads*head_dim], keys/values [B, kv_heads, S, head_dim] -> o_proj(attention) [B, T, hidden]."""
        out = torch.empty(q.shape[0], q.shape[1], self.shape.hidden)
        try:
            self._native.attend(
                _f32(q).numpy(), _kv_array(keys), _kv_array(values), None if mask is None else mask.numpy(), out.numpy()
            )
        except ValueError as exc:
            raise OperatorError(f"cpu_attention for {self.module_name!r}: {exc}") from None
        return out

    def _attend_torch(self, q, keys, values, mask):
        """Many new tokens: torch's sdpa (matrix products), then o_proj in our kernels."""
        s = self.shape
        B, T = q.shape[0], q.shape[1]
        q4 = q.view(B, T, s.heads, s.head_dim).transpose(1, 2).to(keys.dtype)
        S = keys.shape[-2]
        if mask is None and S != T:  # causal with the new tokens last
            mask = torch.ones(T, S, dtype=torch.bool).tril(S - T).unsqueeze(0)
        attn_mask = None if mask is None else mask.unsqueeze(1).to(keys.device)
        ctx = F.scaled_dot_product_attention(
            q4,
            keys,
            values,
            attn_mask=attn_mask,
            is_causal=mask is None and T > 1,
            scale=s.scale,
            enable_gqa=s.heads != s.kv_heads,
        )
        ctx = ctx.transpose(1, 2).reshape(B, T, s.heads * s.head_dim)
        return self.o_proj(ctx)  # forward: the custom op inside a compiled graph

    def extra_repr(self) -> str:
        s = self.shape
        return (
            f"heads={s.heads}, kv_heads={s.kv_heads}, head_dim={s.head_dim}, qk_norm={s.qk_norm}, "
            f"native_tokens={self.config.native_tokens}"
        )


def _linear_config(config: CpuAttentionConfig) -> CpuLinearConfig:
    return CpuLinearConfig(
        weight_type=config.weight_type, threads=config.threads, numa_nodes=config.numa_nodes, isa=config.isa
    )


def _float_array(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


def _f32(t: torch.Tensor) -> torch.Tensor:
    if t.dtype is not torch.float32 or t.device.type != "cpu" or t.requires_grad:
        t = t.detach().to(device="cpu", dtype=torch.float32)
    return t if t.is_contiguous() else t.contiguous()


# The model computes cos/sin (and the mask) once per forward and hands the same tensors to every layer: their
# per-token float32 rows are made once and reused by the following layers. One slot, replaced as a whole (a
# tuple), holding the source tensors so their identity stays unique while cached; thread-safe by construction.
_rotary_slot: tuple = ()
_mask_slot: tuple = ()


def rotary_rows(cos: torch.Tensor, sin: torch.Tensor, batch: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [batch or 1, tokens, rot] -> float32 contiguous [batch * tokens, rot] each (cached per step)."""
    global _rotary_slot
    if torch.compiler.is_compiling():  # no Python-side state inside a compiled graph
        return _f32(_per_token(cos, batch, tokens)), _f32(_per_token(sin, batch, tokens))
    slot = _rotary_slot
    if slot and slot[0] is cos and slot[1] is sin and slot[2] == batch and slot[3] == tokens:
        return slot[4], slot[5]
    rows = _f32(_per_token(cos, batch, tokens)), _f32(_per_token(sin, batch, tokens))
    _rotary_slot = (cos, sin, batch, tokens, *rows, rows[0].numpy(), rows[1].numpy())
    return rows


def rotary_row_arrays(cos: torch.Tensor, sin: torch.Tensor, batch: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """rotary_rows as the numpy arrays the bindings read (cached with them; not for compiled graphs)."""
    slot = _rotary_slot
    if slot and slot[0] is cos and slot[1] is sin and slot[2] == batch and slot[3] == tokens:
        return slot[6], slot[7]
    rows = rotary_rows(cos, sin, batch, tokens)  # fills the slot for the next layers
    return rows[0].numpy(), rows[1].numpy()


def mask_rows(mask: Any, n_keys: int, name: str) -> torch.Tensor | None:
    """_mask_rows, cached per step (every layer gets the same mask)."""
    global _mask_slot
    if mask is None or torch.compiler.is_compiling():
        return _mask_rows(mask, n_keys, name)
    slot = _mask_slot
    if slot and slot[0] is mask and slot[1] == n_keys:
        return slot[2]
    rows = _mask_rows(mask, n_keys, name)
    _mask_slot = (mask, n_keys, rows)
    return rows


def _per_token(t: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
    """cos or sin [batch or 1, tokens, rot] -> [batch * tokens, rot]."""
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.shape[0] != batch:
        t = t.expand(batch, *t.shape[1:])
    return t.reshape(batch * tokens, t.shape[-1])


_warned_cache_dtypes: set[torch.dtype] = set()


def _kv_array(t: torch.Tensor) -> np.ndarray:
    if t.requires_grad:
        t = t.detach()
    if t.dtype is torch.float32:
        return t.numpy()
    if t.dtype is torch.bfloat16:
        return t.view(torch.int16).numpy()
    if t.dtype not in _warned_cache_dtypes:
        _warned_cache_dtypes.add(t.dtype)
        logger.warning(
            "cpu_attention reads float32 or bfloat16 caches; a %s cache is copied to float32 at every call (slower: "
            "load the model in bfloat16 or float32)",
            t.dtype,
        )
    return t.to(torch.float32).numpy()


def _mask_rows(mask: Any, n_keys: int, name: str) -> torch.Tensor | None:
    """transformers' 4-D attention mask [B, 1, T, >=S] as [B, T, S] rows (bool, or float32 added to scores)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise OperatorError(
            f"cpu_attention for {name!r}: the model passed a {type(mask).__name__} attention mask; "
            "use attn_implementation='sdpa' or 'eager'"
        )
    if mask.dim() == 4:
        mask = mask[:, 0]
    mask = mask[..., :n_keys]
    if mask.dtype is not torch.bool and mask.dtype is not torch.float32:
        mask = mask.to(torch.float32)
    if mask.stride(-1) != 1:
        mask = mask.contiguous()
    return mask
