"""The CPU operators as torch custom ops (``torch.ops.ktinject.cpu_linear``, ``cpu_experts``, ``cpu_attention_*``).

Eager calls go straight to the operators (a custom op's dispatch costs microseconds per call at one token).
Under ``torch.compile`` the operators call these ops instead, so dynamo traces a model through them as opaque
nodes with known output shapes (no graph break) and the compiled graph calls our kernels. An operator is
referred to by an integer handle (ops take tensors and numbers only); the registry holds operators weakly.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Any

import torch

from ktinject.errors import OperatorError

_operators: dict[int, weakref.ref] = {}
_handles = itertools.count(1)
_lock = threading.Lock()


def register(operator: Any) -> int:
    """A handle for ``operator`` (valid while it lives)."""
    with _lock:
        handle = next(_handles)
        _operators[handle] = weakref.ref(operator, lambda _, h=handle: _operators.pop(h, None))
    return handle


def _operator(handle: int) -> Any:
    ref = _operators.get(handle)
    operator = ref() if ref is not None else None
    if operator is None:
        raise OperatorError(f"no live ktinject operator has handle {handle}")
    return operator


# Defined through torch.library.Library with a CPU kernel rather than torch.library.custom_op: the latter wraps
# every call in its autograd machinery, measured at ~10 us per call against ~2.5 us here (these ops run under
# no_grad; they have no backward).
_library = torch.library.Library("ktinject", "DEF")
_library.define("cpu_linear(Tensor x, int handle) -> Tensor")
_library.define("cpu_experts(Tensor hidden_states, Tensor top_k_index, Tensor top_k_weights, int handle) -> Tensor")
_library.define("cpu_router(Tensor x, int handle) -> (Tensor, Tensor, Tensor)")
_library.define("cpu_decoder_layer_pre(Tensor x, Tensor cos, Tensor sin, int handle) -> (Tensor, Tensor, Tensor)")
_library.define(
    "cpu_decoder_layer_post(Tensor q, Tensor keys, Tensor values, Tensor? mask, Tensor x, int handle) -> Tensor"
)
_library.define("cpu_attention_project(Tensor x, Tensor cos, Tensor sin, int handle) -> (Tensor, Tensor, Tensor)")
_library.define("cpu_attention_attend(Tensor q, Tensor keys, Tensor values, Tensor? mask, int handle) -> Tensor")


def _cpu_linear(x: torch.Tensor, handle: int) -> torch.Tensor:
    return _operator(handle).run(x)


def _cpu_experts(
    hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, handle: int
) -> torch.Tensor:
    return _operator(handle).run(hidden_states, top_k_index, top_k_weights)


def _cpu_router(x: torch.Tensor, handle: int):
    return _operator(handle).run(x)


def _cpu_decoder_layer_pre(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, handle: int):
    return _operator(handle).run_pre(x, cos, sin)


def _cpu_decoder_layer_post(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, x: torch.Tensor, handle: int
) -> torch.Tensor:
    return _operator(handle).run_post(q, keys, values, mask, x)


def _cpu_attention_project(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, handle: int):
    return _operator(handle).run_project(x, cos, sin)


def _cpu_attention_attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, handle: int
) -> torch.Tensor:
    return _operator(handle).run_attend(q, keys, values, mask)


_library.impl("cpu_linear", _cpu_linear, "CPU")
_library.impl("cpu_attention_project", _cpu_attention_project, "CPU")
_library.impl("cpu_router", _cpu_router, "CPU")
_library.impl("cpu_decoder_layer_pre", _cpu_decoder_layer_pre, "CPU")
_library.impl("cpu_decoder_layer_post", _cpu_decoder_layer_post, "CPU")
_library.impl("cpu_attention_attend", _cpu_attention_attend, "CPU")
_library.impl("cpu_experts", _cpu_experts, "CPU")


@torch.library.register_fake("ktinject::cpu_linear")
def _cpu_linear_fake(x: torch.Tensor, handle: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], _operator(handle).out_features)


@torch.library.register_fake("ktinject::cpu_experts")
def _cpu_experts_fake(
    hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, handle: int
) -> torch.Tensor:
    return hidden_states.new_empty(hidden_states.shape)


@torch.library.register_fake("ktinject::cpu_attention_project")
def _cpu_attention_project_fake(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, handle: int):
    shape = _operator(handle).shape
    n = x.shape[0]
    return (
        x.new_empty(n, shape.heads * shape.head_dim, dtype=torch.float32),
        x.new_empty(n, shape.kv_heads * shape.head_dim, dtype=torch.float32),
        x.new_empty(n, shape.kv_heads * shape.head_dim, dtype=torch.float32),
    )


@torch.library.register_fake("ktinject::cpu_attention_attend")
def _cpu_attention_attend_fake(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, handle: int
) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1], _operator(handle).shape.hidden, dtype=torch.float32)


@torch.library.register_fake("ktinject::cpu_router")
def _cpu_router_fake(x: torch.Tensor, handle: int):
    op = _operator(handle)
    n = x.shape[0]
    return (
        x.new_empty(n, op.num_experts, dtype=torch.float32),
        x.new_empty(n, op.top_k, dtype=torch.float32),
        x.new_empty(n, op.top_k, dtype=torch.int64),
    )


@torch.library.register_fake("ktinject::cpu_decoder_layer_pre")
def _cpu_decoder_layer_pre_fake(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, handle: int):
    shape = _operator(handle).self_attn.shape
    n = x.shape[0]
    stream = torch.bfloat16 if x.dtype is torch.bfloat16 else torch.float32  # k, v in the stream's dtype
    return (
        x.new_empty(n, shape.heads * shape.head_dim, dtype=torch.float32),
        x.new_empty(n, shape.kv_heads * shape.head_dim, dtype=stream),
        x.new_empty(n, shape.kv_heads * shape.head_dim, dtype=stream),
    )


@torch.library.register_fake("ktinject::cpu_decoder_layer_post")
def _cpu_decoder_layer_post_fake(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, x: torch.Tensor, handle: int
) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.bfloat16 if x.dtype is torch.bfloat16 else torch.float32)


cpu_linear = torch.ops.ktinject.cpu_linear.default
cpu_decoder_layer_pre = torch.ops.ktinject.cpu_decoder_layer_pre.default
cpu_decoder_layer_post = torch.ops.ktinject.cpu_decoder_layer_post.default
cpu_router = torch.ops.ktinject.cpu_router.default
cpu_attention_project = torch.ops.ktinject.cpu_attention_project.default
cpu_attention_attend = torch.ops.ktinject.cpu_attention_attend.default
cpu_experts = torch.ops.ktinject.cpu_experts.default
