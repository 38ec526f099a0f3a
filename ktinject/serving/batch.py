"""The KV cache of the requests being decoded together, as one left-padded batch.

Every row shares one timeline of ``length`` positions; a row's own tokens are the last ones of it and the
positions before are padding, masked out by ``mask``. This is the layout transformers' own batched
``generate()`` uses for left-padded prompts, so the stock attention and mask code serve it unchanged. Rows
join after their own (unpadded) prefill and leave when finished; the cache is re-laid out only then, never
per token. Positions (RoPE) are passed explicitly per row, so padding does not shift them.

A sliding-window layer keeps only the last ``window - 1`` positions of the timeline; padding and trimming
respect that. Cache layers of other kinds (linear attention, quantized, static) cannot be re-laid out here:
``supports_batching`` says so and the engine then decodes one request at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _layer_kinds():
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    return DynamicLayer, DynamicSlidingWindowLayer


def supports_batching(cache) -> bool:
    """Whether every layer of ``cache`` is a plain dynamic layer (full or sliding window) this module can re-lay out."""
    full, sliding = _layer_kinds()
    return all(type(layer) in (full, sliding) for layer in cache.layers)


def _window_cap(layer) -> int | None:
    """How many positions a sliding layer keeps (None for a full-attention layer)."""
    _, sliding = _layer_kinds()
    return layer.sliding_window - 1 if isinstance(layer, sliding) else None


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """Prepend ``n`` zero positions on the sequence dimension (-2) of a ``[B, H, L, D]`` tensor."""
    return F.pad(t, (0, 0, n, 0)) if n > 0 else t


class PaddedBatch:
    """Rows of a shared, left-padded KV cache and their 2D attention mask (1 = real token, 0 = padding)."""

    def __init__(self) -> None:
        self.cache = None
        self.mask: torch.Tensor | None = None  # [rows, length] long

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def length(self) -> int:
        """Positions in the shared timeline (the longest row's real length after trimming)."""
        return 0 if self.mask is None else self.mask.shape[1]

    def add(self, cache, length: int) -> None:
        """Append one row: ``cache`` holds exactly ``length`` real positions of a batch-1 prefill (no padding)."""
        device = cache.layers[0].keys.device
        mask = torch.ones(1, length, dtype=torch.long, device=device)
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        total = max(self.length, length)
        pad_old, pad_new = total - self.length, total - length
        for old, new in zip(self.cache.layers, cache.layers):
            cap = _window_cap(old)
            keys = torch.cat([self._fit(old.keys, pad_old, cap), self._fit(new.keys, pad_new, cap)])
            values = torch.cat([self._fit(old.values, pad_old, cap), self._fit(new.values, pad_new, cap)])
            old.keys, old.values = keys, values
            if cap is not None:
                old.cumulative_length = total
        self.mask = torch.cat([F.pad(self.mask, (pad_old, 0)), F.pad(mask, (pad_new, 0))])

    @staticmethod
    def _fit(t: torch.Tensor, pad: int, cap: int | None) -> torch.Tensor:
        t = _pad_left(t, pad)
        return t[:, :, -cap:, :] if cap is not None and t.shape[-2] > cap else t

    def step_mask(self) -> torch.Tensor:
        """The mask for the next decode step (one new real position per row); becomes ``mask`` via ``advance``."""
        return F.pad(self.mask, (0, 1), value=1)

    def advance(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); drop the leading positions that are padding in every kept row."""
        if not rows:
            self.cache = self.mask = None
            return
        if rows != list(range(self.rows)):
            index = torch.tensor(rows, device=self.mask.device)
            self.mask = self.mask.index_select(0, index)
            for layer in self.cache.layers:
                layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))
                layer.values = layer.values.index_select(0, index.to(layer.values.device))
        real = int(self.mask.sum(dim=1).max())
        drop = self.length - real
        if drop <= 0:
            return
        total = self.length
        for layer in self.cache.layers:
            cap = _window_cap(layer)
            held = layer.keys.shape[-2]
            cut = max(0, drop - (total - held))  # positions held by this layer start at total - held
            if cut:
                layer.keys, layer.values = layer.keys[:, :, cut:, :], layer.values[:, :, cut:, :]
            if cap is not None:
                layer.cumulative_length = total - drop
        self.mask = self.mask[:, drop:]

    def clear(self) -> None:
        self.cache = self.mask = None
