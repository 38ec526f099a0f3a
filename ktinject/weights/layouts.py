"""How one HF tensor is put together from stored tensors (a :class:`Recipe`), and doing it chunk by chunk.

A recipe names the stored parts in HF order and a :class:`Layout` that says where each part goes. Layouts
know only shapes, so a whole model's recipes are checked against the HF shapes before any data is read.
Assembly reads each part a few rows (along its first axis) at a time, writes them straight into the
output tensor on its device and dtype, and drops the file pages it has consumed: a part is never held whole
in float32, and RAM stays close to the size of what is kept. ``assemble_rows`` builds only some rows of the
first axis (a few experts of a stacked experts tensor), reading only the parts and rows they come from.

Layouts (each the inverse of a conversion a real converter does):

- ``Direct``: the stored tensor is the HF tensor.
- ``Concat(dim)``: parts concatenated (GGUF ``ffn_gate_exps`` + ``ffn_up_exps`` -> ``gate_up_proj``).
- ``StackConcat(groups, dim)``: per-expert checkpoint tensors stacked along a new first axis, the groups
  (gate, up) concatenated along ``dim`` (transformers' MergeModulelist + Concatenate).
- ``Interleave(transpose)``: GPT-OSS's gate/up interleaving (gate at even, up at odd columns) from
  separate GGUF gate/up tensors, transposed for the weights.
- ``Transpose``: the last two axes swapped (GPT-OSS ``down_proj`` from GGUF).
- ``UnpermuteRope(heads)``: llama.cpp reorders the rows of ``attn_q``/``attn_k`` of the llama architecture
  (Llama, Mistral, Mixtral) for its rope kernel; this undoes it.
- ``MlaKvB(heads)``: DeepSeek MLA GGUFs split ``kv_b_proj`` into ``attn_k_b`` (transposed) and ``attn_v_b``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

Shape = tuple[int, ...]
CHUNK_BYTES = 16 << 20  # float32 bytes dequantized at a time (bounds the transient memory of a load)


class LayoutError(ValueError):
    """The parts do not fit together (the message says how); reported as a WeightError by the sources."""


class Layout:
    """Where each part goes in the assembled tensor."""

    chunkable = True  # False: a part is read whole (the transform mixes rows)

    def shape(self, shapes: Sequence[Shape]) -> Shape:
        raise NotImplementedError

    def write(
        self, out: torch.Tensor, shapes: Sequence[Shape], index: int, start: int, stop: int, rows: torch.Tensor
    ) -> None:
        """Put rows ``[start, stop)`` (first axis) of part ``index`` into ``out`` (of ``self.shape(shapes)``)."""
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def stored_row_order(self, shapes: Sequence[Shape]) -> torch.Tensor | None | bool:
        """How the assembled tensor's rows (first axis) map onto one stored part's rows, each row intact:
        ``None`` when they are the stored rows in order, an index tensor when they are a permutation of them,
        ``False`` when assembly changes rows' contents (then only dequantized values can be had)."""
        return False


def _count(shapes: Sequence[Shape], n: int, what: str) -> None:
    if len(shapes) != n:
        raise LayoutError(f"{what} takes {n} part(s), got {len(shapes)}")


@dataclasses.dataclass(frozen=True)
class Direct(Layout):
    def shape(self, shapes):
        _count(shapes, 1, "a direct tensor")
        return tuple(shapes[0])

    def write(self, out, shapes, index, start, stop, rows):
        out[start:stop].copy_(rows.reshape(out[start:stop].shape))

    def stored_row_order(self, shapes):
        return None


def _concat_shape(shapes: Sequence[Shape], dim: int) -> Shape:
    first = shapes[0]
    for s in shapes[1:]:
        if len(s) != len(first) or any(a != b for i, (a, b) in enumerate(zip(s, first)) if i != dim):
            raise LayoutError(f"parts of shapes {[tuple(x) for x in shapes]} cannot be concatenated along axis {dim}")
    return tuple(sum(s[dim] for s in shapes) if i == dim else d for i, d in enumerate(first))


@dataclasses.dataclass(frozen=True)
class Concat(Layout):
    dim: int

    def shape(self, shapes):
        if not shapes:
            raise LayoutError("nothing to concatenate")
        return _concat_shape(shapes, self.dim)

    def write(self, out, shapes, index, start, stop, rows):
        offset = sum(s[self.dim] for s in shapes[:index])
        if self.dim == 0:
            out[offset + start : offset + stop].copy_(rows)
        else:
            out[start:stop].narrow(self.dim, offset, shapes[index][self.dim]).copy_(rows)

    def describe(self):
        return f"concat(axis {self.dim})"


@dataclasses.dataclass(frozen=True)
class StackConcat(Layout):
    groups: int  # parts are group-major: groups x n per-expert tensors
    dim: int = 0  # axis of a part along which the groups are concatenated

    def shape(self, shapes):
        if not shapes or len(shapes) % self.groups:
            raise LayoutError(f"{len(shapes)} per-expert tensors do not split into {self.groups} equal groups")
        n = len(shapes) // self.groups
        group_shapes = []
        for g in range(self.groups):
            members = {tuple(s) for s in shapes[g * n : (g + 1) * n]}
            if len(members) != 1:
                raise LayoutError(f"per-expert tensors of group {g} have different shapes: {sorted(members)}")
            group_shapes.append(members.pop())
        return (n, *_concat_shape(group_shapes, self.dim))

    def write(self, out, shapes, index, start, stop, rows):
        n = len(shapes) // self.groups
        group, expert = divmod(index, n)
        offset = sum(shapes[g * n][self.dim] for g in range(group))
        size = shapes[index][self.dim]
        target = out[expert]
        if self.dim == 0:
            target.narrow(0, offset + start, stop - start).copy_(rows)
        else:
            target[start:stop].narrow(self.dim, offset, size).copy_(rows)

    def describe(self):
        return f"stack {self.groups} group(s) of per-expert tensors" + (
            f", concat(axis {self.dim + 1})" if self.groups > 1 else ""
        )


@dataclasses.dataclass(frozen=True)
class Interleave(Layout):
    transpose: bool  # weights [E, I, H] x2 -> [E, H, 2I]; biases [E, I] x2 -> [E, 2I]

    def shape(self, shapes):
        _count(shapes, 2, "an interleaved gate/up tensor")
        if tuple(shapes[0]) != tuple(shapes[1]):
            raise LayoutError(f"gate {tuple(shapes[0])} and up {tuple(shapes[1])} differ")
        s = shapes[0]
        if self.transpose:
            if len(s) != 3:
                raise LayoutError(f"expected [E, I, H] gate/up weights, got {tuple(s)}")
            return (s[0], s[2], 2 * s[1])
        return (*s[:-1], 2 * s[-1])

    def write(self, out, shapes, index, start, stop, rows):
        if self.transpose:
            out[start:stop, :, index::2].copy_(rows.transpose(-1, -2))
        else:
            out[start:stop, ..., index::2].copy_(rows)

    def describe(self):
        return "interleave gate/up" + (" (transposed)" if self.transpose else "")


@dataclasses.dataclass(frozen=True)
class Transpose(Layout):
    def shape(self, shapes):
        _count(shapes, 1, "a transposed tensor")
        s = shapes[0]
        if len(s) < 2:
            raise LayoutError(f"cannot transpose a {len(s)}-D tensor")
        return (*s[:-2], s[-1], s[-2])

    def write(self, out, shapes, index, start, stop, rows):
        out[start:stop].copy_(rows.transpose(-1, -2))


@dataclasses.dataclass(frozen=True)
class UnpermuteRope(Layout):
    heads: int
    chunkable = False

    def shape(self, shapes):
        _count(shapes, 1, "a rope-permuted tensor")
        s = shapes[0]
        if not s or s[0] % (2 * self.heads):
            raise LayoutError(f"{s[0] if s else 0} rows do not split into {self.heads} heads of even size")
        return tuple(s)

    def write(self, out, shapes, index, start, stop, rows):
        n = rows.shape[0]
        rest = tuple(rows.shape[1:])
        # llama.cpp: view(heads, 2, d/2, ...).swap(1, 2); the inverse swaps back.
        out.copy_(rows.reshape(self.heads, n // self.heads // 2, 2, *rest).transpose(1, 2).reshape(n, *rest))

    def describe(self):
        return f"undo llama.cpp's rope row order ({self.heads} heads)"

    def stored_row_order(self, shapes):
        n = self.shape(shapes)[0]
        return torch.arange(n).reshape(self.heads, n // self.heads // 2, 2).transpose(1, 2).reshape(n)


@dataclasses.dataclass(frozen=True)
class MlaKvB(Layout):
    """``attn_k_b [h, rank, nope]`` and ``attn_v_b [h, v, rank]`` -> ``kv_b_proj [h * (nope + v), rank]``."""

    def shape(self, shapes):
        _count(shapes, 2, "an MLA kv_b tensor")
        k, v = shapes
        if len(k) != 3 or len(v) != 3 or k[0] != v[0] or k[1] != v[2]:
            raise LayoutError(f"attn_k_b {tuple(k)} and attn_v_b {tuple(v)} do not describe one kv_b_proj")
        return (k[0] * (k[2] + v[1]), k[1])

    def write(self, out, shapes, index, start, stop, rows):
        (heads, rank, nope), (_, vdim, _) = shapes
        view = out.view(heads, nope + vdim, rank)
        if index == 0:
            view[start:stop, :nope].copy_(rows.transpose(1, 2))
        else:
            view[start:stop, nope:].copy_(rows)

    def describe(self):
        return "join MLA attn_k_b/attn_v_b"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An HF tensor made from stored tensors ``parts`` (in HF order) placed by ``layout``."""

    name: str
    parts: tuple[str, ...]
    layout: Layout


@dataclasses.dataclass(frozen=True)
class Unresolved:
    """An HF tensor a source cannot serve, and why (``missing blk.3.ffn_up_exps.weight``...)."""

    name: str
    reason: str


def same_up_to_ones(a: Shape, b: Shape) -> bool:
    """Equal shapes, or equal once size-1 axes are dropped (GGUF stores ``[1, H]`` tensors as ``[H]``)."""
    return tuple(a) == tuple(b) or (
        math.prod(a) == math.prod(b) and [d for d in a if d != 1] == [d for d in b if d != 1]
    )


def assemble(
    layout: Layout,
    parts: Sequence,  # StoredTensor
    out: torch.Tensor,
    *,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Fill ``out`` (of ``layout.shape``) from ``parts``, a chunk of rows at a time, releasing file pages."""
    shapes = [p.shape for p in parts]
    for index, part in enumerate(parts):

        def write(start, stop, rows, index=index):
            layout.write(out, shapes, index, start, stop, rows)

        _copy_rows(part, 0, part.num_rows, write, on_bytes, whole=not layout.chunkable)


def _copy_rows(
    part,
    start: int,
    stop: int,
    write: Callable[[int, int, torch.Tensor], None],
    on_bytes: Callable[[int], None] | None,
    *,
    whole: bool = False,
) -> None:
    """Rows [start, stop) of ``part`` a chunk at a time (all at once if ``whole``) into
    ``write(chunk_start, chunk_stop, rows)``, dropping each chunk's file pages after it is written."""
    floats_per_row = max(1, math.prod(part.shape[1:]))
    step = max(1, stop - start) if whole else max(1, CHUNK_BYTES // (4 * floats_per_row))
    for lo in range(start, stop, step):
        hi = min(stop, lo + step)
        write(lo, hi, part.rows(lo, hi))
        part.release(lo, hi)
        if on_bytes is not None:
            on_bytes((hi - lo) * part.row_bytes)


def assemble_rows(
    layout: Layout,
    parts: Sequence,  # StoredTensor
    out: torch.Tensor,
    start: int,
    stop: int,
    *,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Fill ``out`` with rows ``[start, stop)`` (first axis) of the assembled tensor, reading only their parts.

    This is how an operator streams a stacked experts tensor a few experts at a time: the whole tensor (a
    layer's experts, tens of GiB for the largest models in bf16) never exists at once. Layouts whose first
    axis is the experts axis are supported; LayoutError for the others (use :func:`assemble`).
    """
    shapes = [tuple(p.shape) for p in parts]
    rows = stop - start
    if isinstance(layout, StackConcat):  # one part per expert and group: take the window's experts
        n = len(parts) // layout.groups
        window = [g * n + e for g in range(layout.groups) for e in range(start, stop)]
        window_shapes = [shapes[i] for i in window]
        for new_index, index in enumerate(window):
            part = parts[index]

            def write(lo, hi, chunk, new_index=new_index):
                layout.write(out, window_shapes, new_index, lo, hi, chunk)

            _copy_rows(part, 0, part.num_rows, write, on_bytes)
        return
    if isinstance(layout, (Direct, Transpose, Interleave)) or (isinstance(layout, Concat) and layout.dim != 0):
        window_shapes = [(rows, *s[1:]) for s in shapes]  # part row r is output row r
        for index, part in enumerate(parts):

            def write(lo, hi, chunk, index=index):
                layout.write(out, window_shapes, index, lo - start, hi - start, chunk)

            _copy_rows(part, start, stop, write, on_bytes)
        return
    raise LayoutError(f"{layout.describe()} does not assemble by rows of its first axis")
