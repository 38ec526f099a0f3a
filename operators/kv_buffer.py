"""Room to grow in transformers' default KV cache, so a fused layer writes its new keys and values in C++.

transformers' ``DynamicLayer`` keeps a layer's keys and values as ``[batch, kv_heads, length, head_dim]``
tensors and grows them with ``torch.cat`` at every step: a new tensor, a copy of the whole cache, and Python
between the two halves of the layer. Here the layer's ``keys``/``values`` become views of the first ``length``
positions of larger buffers: the C++ step writes the new tokens past the end and the views are replaced by
one position longer ones. Everything transformers does with the layer keeps working, because only the public
``keys``/``values`` attributes are touched and the buffers are re-adopted whenever they no longer back them:

- ``crop`` (assisted decoding) leaves shorter views of the same buffers: writing goes on from the new end;
- ``reorder_cache`` / ``batch_select_indices`` / ``batch_repeat_interleave`` / ``offload`` / another op's
  ``update`` leave new tensors: the next step copies them into fresh buffers (once, like one ``torch.cat``);
- ``reset`` drops them (``keys is None``): the next step takes the ordinary path.

Capacity grows geometrically, by an eighth (at most 12.5% of the cache unused; a token's keys are copied about
eight times over a long generation, which at one token costs far less than the layer's weights), with a floor
of ``MIN_SPARE`` positions. transformers' own ``torch.cat`` copies the whole cache at every step.
A tensor taken from ``layer.keys`` earlier keeps its length, but after a ``crop`` the positions past the
new end are rewritten (with ``torch.cat`` they would be a private copy): keep a ``clone()`` instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

try:  # transformers >= 4.56: caches are lists of layer objects
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover - older transformers: every call takes the ordinary path
    DynamicLayer = None  # type: ignore[assignment,misc]

MIN_SPARE = 256  # positions added at least, whenever a buffer is (re)made
GROWTH_DIVISOR = 8  # ... and at least 1/8 of the length: at most 12.5% unused, each token copied ~8 times over
_SLOT = "_ktinject_kv_buffer"  # attribute of the DynamicLayer holding its _Buffers


class _Buffers:
    """The buffers behind one cache layer, and the views of them the layer was last given (``commit``)."""

    __slots__ = (
        "keys",
        "values",
        "shape",
        "strides",
        "capacity",
        "length",
        "keys_view",
        "values_view",
    )

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        self.keys, self.values = keys, values  # [batch, kv_heads, capacity, head_dim], both contiguous
        self.shape, self.strides = tuple(keys.shape), keys.stride()
        self.capacity = keys.shape[2]
        self.length = length
        self.keys_view: torch.Tensor | None = None
        self.values_view: torch.Tensor | None = None

    def backs(self, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """True when keys/values are views of the first positions of these buffers."""
        return (
            keys.data_ptr() == self.keys.data_ptr()
            and values.data_ptr() == self.values.data_ptr()
            and keys.stride() == self.keys.stride()
            and values.stride() == self.values.stride()
            and keys.shape[:2] == self.keys.shape[:2]
            and values.shape == keys.shape
        )


class KvRoom:
    """Where one step writes: the layer's buffers, with ``n_past`` positions filled and room for the new ones."""

    __slots__ = ("layer", "buffers", "n_past")

    def __init__(self, layer: Any, buffers: _Buffers, n_past: int) -> None:
        self.layer, self.buffers, self.n_past = layer, buffers, n_past

    def step(self, native_step, x, cos, sin, mask, out, tokens: int) -> None:
        """Run a native ``step(x, cos, sin, keys, values, n_past, mask, out)`` that appends ``tokens`` positions
        to these buffers, then commit them (not when it raises: the layer then keeps its old views)."""
        b = self.buffers
        # The arrays are made at each step, never kept: a copied cache (copy.deepcopy, as transformers suggests to
        # reuse a prompt's cache) copies the tensors with their views, but a kept numpy array would still point
        # at the original's memory.
        native_step(x, cos, sin, _array(b.keys), _array(b.values), self.n_past, mask, out)
        self.commit(tokens)

    def commit(self, tokens: int) -> None:
        """After the step wrote ``tokens`` new positions: the layer's views grow to cover them."""
        b = self.buffers
        b.length = n = self.n_past + tokens
        shape = (b.shape[0], b.shape[1], n, b.shape[3])
        b.keys_view = self.layer.keys = b.keys.as_strided(shape, b.strides)
        b.values_view = self.layer.values = b.values.as_strided(shape, b.strides)


def step_room(cache: Any, layer_idx: int, kv_heads: int, head_dim: int, x: torch.Tensor) -> KvRoom | None:
    """Room for ``x``'s tokens ([batch, tokens, hidden]) in transformers' cache layer ``layer_idx``, or None
    when that layer is not a plain filled ``DynamicLayer`` holding ``x.dtype`` keys (the caller then hands its
    keys and values to ``cache.update``). Steady decoding costs a few identity checks here."""
    try:
        layer = cache.layers[layer_idx]
        buffers = layer.__dict__.get(_SLOT)
    except (AttributeError, IndexError, TypeError):
        return None
    tokens = x.shape[1]
    if (
        buffers is not None
        and layer.keys is buffers.keys_view
        and layer.values is buffers.values_view
        and buffers.keys.dtype is x.dtype
        and buffers.length + tokens <= buffers.capacity
    ):
        return KvRoom(layer, buffers, buffers.length)
    if appendable_layer(cache, layer_idx, x.shape[0], kv_heads, head_dim, x.dtype) is None:
        return None
    return room_for(layer, tokens)


def appendable_layer(cache: Any, layer_idx: int, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """transformers' cache layer ``layer_idx`` when it is a plain, filled ``DynamicLayer`` on the CPU holding
    ``dtype`` (float32 or bfloat16) keys of this shape; None otherwise (the caller takes the ordinary path)."""
    if DynamicLayer is None or dtype not in (torch.float32, torch.bfloat16) or getattr(cache, "offloading", False):
        return None
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    if type(layer) is not DynamicLayer or not layer.is_initialized:  # subclasses slide, quantize, index...
        return None
    keys, values = layer.keys, layer.values
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor) or keys.dim() != 4:
        return None
    if keys.dtype is not dtype or values.dtype is not dtype or keys.device.type != "cpu":
        return None
    if tuple(keys.shape[:2]) != (batch, kv_heads) or keys.shape[3] != head_dim or values.shape != keys.shape:
        return None
    if keys.requires_grad or values.requires_grad:
        return None
    return layer


def room_for(layer: Any, tokens: int) -> KvRoom:
    """Buffers behind ``layer``'s keys/values with room for ``tokens`` more positions (made or grown as needed)."""
    keys, values = layer.keys, layer.values
    n_past = keys.shape[2]
    buffers: _Buffers | None = layer.__dict__.get(_SLOT)
    if buffers is None or not buffers.backs(keys, values) or n_past + tokens > buffers.capacity:
        buffers = _make_buffers(keys, values, n_past + tokens)
        layer.__dict__[_SLOT] = buffers
    return KvRoom(layer, buffers, n_past)


def _make_buffers(keys: torch.Tensor, values: torch.Tensor, needed: int) -> _Buffers:
    n_past = keys.shape[2]
    capacity = needed + max(MIN_SPARE, needed // GROWTH_DIVISOR)
    shape = (keys.shape[0], keys.shape[1], capacity, keys.shape[3])
    k = torch.empty(shape, dtype=keys.dtype)
    v = torch.empty(shape, dtype=values.dtype)
    k[:, :, :n_past].copy_(keys)
    v[:, :, :n_past].copy_(values)
    return _Buffers(k, v, n_past)


def _array(t: torch.Tensor) -> np.ndarray:
    return t.numpy() if t.dtype is torch.float32 else t.view(torch.int16).numpy()
