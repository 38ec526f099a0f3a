"""``FileSource``: the part of a file-backed WeightSource that does not depend on the file format.

A subclass (GGUF, safetensors) fills ``_stored`` (file name -> :class:`StoredTensor`) when it opens its
files, and turns HF names into :class:`Recipe` objects in ``_recipe`` once it knows the model
(:meth:`bind`). Everything a caller sees (names, info, parts, tensor, check) is implemented here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ktinject.errors import WeightError
from ktinject.weights.layouts import LayoutError, Recipe, Unresolved, assemble, assemble_rows, same_up_to_ones
from ktinject.weights.source import RawTensor, TensorInfo, WeightSource
from ktinject.weights.stored import StoredTensor, float_dtype_of

logger = logging.getLogger(__name__)


class FileSource(WeightSource):
    """Tensors of weight files, served under HF ``state_dict`` names (after :meth:`bind`)."""

    def __init__(self, paths: list[Path], stored: dict[str, StoredTensor]) -> None:
        self.paths = paths
        self._stored = stored
        self._recipes: dict[str, Recipe | Unresolved] = {}
        self._hf_shapes: dict[str, tuple[int, ...]] = {}
        self._handed_out: set[str] = set()
        self.on_bytes: Callable[[int], None] | None = None  # progress callback (bytes of stored data read)

    # -- what subclasses provide ---------------------------------------------------------------------
    def _recipe(self, name: str) -> Recipe | Unresolved:
        """How HF tensor ``name`` is made from this source's stored tensors."""
        raise NotImplementedError

    def _prepare(self, model: nn.Module) -> None:
        """Learn what the naming needs from the model (architecture, layouts); called by :meth:`bind`."""

    # -- binding to a model --------------------------------------------------------------------------
    @property
    def description(self) -> str:
        """The file (or first file and count) for messages."""
        if len(self.paths) == 1:
            return str(self.paths[0])
        return f"{self.paths[0]} (+{len(self.paths) - 1} more files)"

    def bind(self, model: nn.Module) -> None:
        """Resolve every ``state_dict`` name of ``model`` (on meta is fine) to a recipe; reads no data."""
        self._prepare(model)
        self._hf_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self._recipes = {name: self._recipe(name) for name in self._hf_shapes}

    def _resolved(self, name: str) -> Recipe | Unresolved:
        if name not in self._recipes:
            self._recipes[name] = self._recipe(name)
        return self._recipes[name]

    def resolves(self, name: str) -> bool:
        """Whether ``name`` maps to stored tensors (their shapes and types are :meth:`check`'s business)."""
        return isinstance(self._resolved(name), Recipe)

    def resolve(self, name: str) -> Recipe:
        """The recipe for ``name``; WeightError naming the file and the missing pieces otherwise."""
        recipe = self._resolved(name)
        if isinstance(recipe, Unresolved):
            raise WeightError(f"{self.description}: cannot load {name}: {recipe.reason}")
        return recipe

    def stored(self, stored_name: str) -> StoredTensor:
        return self._stored[stored_name]

    def stored_names(self) -> Iterable[str]:
        return self._stored.keys()

    # -- the WeightSource interface ------------------------------------------------------------------
    def names(self) -> Iterable[str]:
        return [n for n, r in self._recipes.items() if isinstance(r, Recipe)]

    def _parts(self, recipe: Recipe) -> list[StoredTensor]:
        return [self._stored[p] for p in recipe.parts]

    def _layout_shape(self, recipe: Recipe) -> tuple[int, ...]:
        try:
            return recipe.layout.shape([p.shape for p in self._parts(recipe)])
        except LayoutError as exc:
            detail = ", ".join(f"{p.name} {p.shape}" for p in self._parts(recipe))
            raise WeightError(f"{self.description}: {recipe.name}: stored parts {detail} do not fit: {exc}") from None

    def info(self, name: str) -> TensorInfo:
        """Shape, stored type and stored bytes of ``name`` (reads no data; for plans made against this file)."""
        recipe = self.resolve(name)
        shape = self._hf_shapes.get(name) or self._layout_shape(recipe)
        parts = self._parts(recipe)
        types = dict.fromkeys(p.type_name for p in parts)
        return TensorInfo(name, tuple(shape), "+".join(types), sum(p.nbytes for p in parts))

    def parts(self, name: str) -> list[RawTensor]:
        recipe = self.resolve(name)
        parts = self._parts(recipe)
        fresh = [p for p in recipe.parts if p not in self._handed_out]
        self._handed_out.update(fresh)
        if self.on_bytes is not None:
            self.on_bytes(sum(self._stored[p].nbytes for p in fresh))
        return [p.raw() for p in parts]

    def _progress(self, recipe: Recipe) -> Callable[[int], None] | None:
        """The progress callback for reading ``recipe``'s parts: none when parts() already counted them all (an
        operator that looked at the stored parts and then asks for floats reads the same bytes once)."""
        return None if all(p in self._handed_out for p in recipe.parts) else self.on_bytes

    def tensor(
        self, name: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        recipe = self.resolve(name)
        parts = self._parts(recipe)
        for part in parts:
            if not part.dequantizable:
                raise WeightError(
                    f"{self.description}: {name}: stored tensor {part.name} has type {part.type_name}, which cannot be dequantized"
                )
        shape = self._layout_shape(recipe)
        out = torch.empty(shape or (1,), dtype=dtype or float_dtype_of(parts), device=device)
        assemble(recipe.layout, parts, out, on_bytes=self._progress(recipe))
        hf_shape = self._hf_shapes.get(name, shape)
        return out.reshape(hf_shape)

    def tensor_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of :meth:`tensor` (first axis, e.g. experts), reading only what they need.

        Falls back to slicing the whole tensor (with a warning: it is materialized) for layouts that do not
        assemble by rows.
        """
        recipe = self.resolve(name)
        parts = self._parts(recipe)
        for part in parts:
            if not part.dequantizable:
                raise WeightError(
                    f"{self.description}: {name}: stored tensor {part.name} has type {part.type_name}, which cannot be dequantized"
                )
        shape = self._hf_shapes.get(name) or self._layout_shape(recipe)
        if not 0 <= start <= stop <= shape[0]:
            raise WeightError(f"{self.description}: {name}: rows [{start}, {stop}) are outside its {shape[0]} rows")
        out = torch.empty((stop - start, *self._layout_shape(recipe)[1:]), dtype=dtype or float_dtype_of(parts))
        try:
            assemble_rows(recipe.layout, parts, out, start, stop, on_bytes=self._progress(recipe))
        except LayoutError:
            logger.warning(
                "%s: %s (%s) is assembled whole to take rows [%d, %d)",
                self.description,
                name,
                recipe.layout.describe(),
                start,
                stop,
            )
            return self.tensor(name, dtype)[start:stop]
        return out.reshape(stop - start, *shape[1:])

    def stored_rows(self, name: str) -> RawTensor | None:
        """``name`` as stored (blocks stay blocks) with its rows in the HF order, or None when the file's layout
        changes rows' contents (transposed, interleaved, split tensors: use ``tensor()``). Zero-copy unless the
        rows are permuted (llama.cpp's rope order of ``attn_q``/``attn_k``), which copies the blocks."""
        recipe = self.resolve(name)
        if len(recipe.parts) != 1:
            return None
        order = recipe.layout.stored_row_order([p.shape for p in self._parts(recipe)])
        if order is False:
            return None
        (raw,) = self.parts(name)
        if order is None:
            return raw
        return dataclasses.replace(raw, data=np.ascontiguousarray(raw.data[order.numpy()]))

    # -- checking and releasing ----------------------------------------------------------------------
    def check(self, name: str, expected_shape: tuple[int, ...] | None, *, dequantize: bool) -> str | None:
        """What is wrong with loading ``name`` (missing, shape, type), or None; reads no data."""
        recipe = self._resolved(name)
        if isinstance(recipe, Unresolved):
            return recipe.reason
        parts = self._parts(recipe)
        try:
            shape = recipe.layout.shape([p.shape for p in parts])
        except LayoutError as exc:
            return "stored " + ", ".join(f"{p.name} {p.shape}" for p in parts) + f" do not fit: {exc}"
        if expected_shape is not None and not same_up_to_ones(shape, expected_shape):
            stored = ", ".join(f"{p.name} {p.shape}" for p in parts)
            return f"shape mismatch: the file gives {shape} (from {stored}), the model expects {tuple(expected_shape)}"
        if dequantize:
            bad = [p for p in parts if not p.dequantizable]
            if bad:
                return ", ".join(f"{p.name} has type {p.type_name}" for p in bad) + ", which cannot be dequantized"
        return None

    def stored_bytes(self, name: str) -> int:
        """Bytes of stored data behind ``name`` (0 when it does not resolve)."""
        recipe = self._resolved(name)
        return 0 if isinstance(recipe, Unresolved) else sum(self._stored[p].nbytes for p in recipe.parts)

    def release(self) -> None:
        """Drop the file pages of every part handed out by :meth:`parts` (since :meth:`end_handout`) from RSS.

        Operators may call it between the batches they copy; the views stay valid (pages are read again if
        touched), so calling it early only costs a re-read.
        """
        for stored_name in self._handed_out:
            part = self._stored[stored_name]
            part.release(0, part.num_rows)

    def end_handout(self) -> None:
        """Release the parts handed out so far and stop tracking them (the loader calls it per operator)."""
        self.release()
        self._handed_out.clear()

    def close(self) -> None:
        """Forget the mapped files (views handed out keep their mapping alive)."""
        self._stored = {}
        self._recipes = {}
