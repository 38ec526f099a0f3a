"""Layouts: each undoes a converter's transform exactly, chunk by chunk, and rejects parts that do not fit."""

from __future__ import annotations

import pytest
import torch

from ktinject.weights import layouts
from ktinject.weights.layouts import (
    Concat,
    Interleave,
    LayoutError,
    MlaKvB,
    StackConcat,
    Transpose,
    UnpermuteRope,
    assemble,
)


class FakePart:
    """A StoredTensor stand-in over a torch tensor, counting the chunks read and released."""

    def __init__(self, name: str, tensor: torch.Tensor) -> None:
        self.name, self.tensor = name, tensor
        self.shape = tuple(tensor.shape)
        self.nbytes = tensor.numel() * 4
        self.reads: list[tuple[int, int]] = []
        self.released: list[tuple[int, int]] = []

    @property
    def num_rows(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.num_rows

    def rows(self, start: int, stop: int) -> torch.Tensor:
        self.reads.append((start, stop))
        return self.tensor[start:stop]

    def release(self, start: int, stop: int) -> None:
        self.released.append((start, stop))


def build(layout, *tensors: torch.Tensor) -> tuple[torch.Tensor, list[FakePart]]:
    parts = [FakePart(f"p{i}", t) for i, t in enumerate(tensors)]
    out = torch.empty(layout.shape([p.shape for p in parts]))
    assemble(layout, parts, out)
    return out, parts


def test_concat_along_rows_of_experts_reads_in_chunks(monkeypatch):
    monkeypatch.setattr(layouts, "CHUNK_BYTES", 2 * 16 * 8 * 4)  # two experts per chunk
    gate, up = torch.randn(5, 16, 8), torch.randn(5, 16, 8)
    out, parts = build(Concat(dim=1), gate, up)
    torch.testing.assert_close(out, torch.cat([gate, up], dim=1), rtol=0, atol=0)
    assert parts[0].reads == [(0, 2), (2, 4), (4, 5)] and parts[0].released == parts[0].reads


def test_stack_concat_per_expert_tensors():
    gates = [torch.randn(6, 4) for _ in range(3)]
    ups = [torch.randn(6, 4) for _ in range(3)]
    out, _ = build(StackConcat(groups=2, dim=0), *gates, *ups)
    expected = torch.cat([torch.stack(gates), torch.stack(ups)], dim=1)
    assert torch.equal(out, expected)


def test_interleave_rebuilds_gpt_oss_layout():
    gate, up = torch.randn(2, 3, 4), torch.randn(2, 3, 4)  # [E, I, H]
    out, _ = build(Interleave(transpose=True), gate, up)  # [E, H, 2I], gate at even columns
    assert out.shape == (2, 4, 6)
    assert torch.equal(out[..., 0::2], gate.transpose(1, 2)) and torch.equal(out[..., 1::2], up.transpose(1, 2))
    bias, _ = build(Interleave(transpose=False), gate[:, :, 0], up[:, :, 0])
    assert torch.equal(bias[:, 0::2], gate[:, :, 0]) and torch.equal(bias[:, 1::2], up[:, :, 0])


def test_transpose_last_two_axes():
    x = torch.randn(2, 3, 5)
    out, _ = build(Transpose(), x)
    assert torch.equal(out, x.transpose(1, 2))


def llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    # What llama.cpp's converter does to attn_q / attn_k of the llama architecture.
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_unpermute_rope_inverts_llama_cpp(heads):
    w = torch.randn(heads * 8, 5)
    out, parts = build(UnpermuteRope(heads), llama_cpp_permute(w, heads))
    assert torch.equal(out, w)
    assert parts[0].reads == [(0, heads * 8)]  # read whole: the transform mixes rows
    bias, _ = build(UnpermuteRope(heads), llama_cpp_permute(w[:, 0].contiguous(), heads))
    assert torch.equal(bias, w[:, 0])


def test_mla_kv_b_joins_k_b_and_v_b():
    heads, nope, vdim, rank = 3, 4, 5, 6
    kv_b = torch.randn(heads * (nope + vdim), rank)
    view = kv_b.view(heads, nope + vdim, rank)
    k_b, v_b = view[:, :nope].transpose(1, 2).contiguous(), view[:, nope:].contiguous()  # llama.cpp's split
    out, _ = build(MlaKvB(), k_b, v_b)
    assert torch.equal(out, kv_b)


@pytest.mark.parametrize(
    "layout, shapes, message",
    [
        (Concat(dim=1), [(4, 3, 8), (4, 3, 9)], "cannot be concatenated along axis 1"),
        (StackConcat(groups=2), [(3, 4)] * 3, "do not split into 2 equal groups"),
        (Interleave(transpose=True), [(2, 3, 4), (2, 3, 5)], "differ"),
        (UnpermuteRope(3), [(8, 2)], "do not split into 3 heads"),
        (MlaKvB(), [(2, 6, 4), (3, 5, 6)], "do not describe one kv_b_proj"),
    ],
)
def test_parts_that_do_not_fit_are_layout_errors(layout, shapes, message):
    with pytest.raises(LayoutError, match=message):
        layout.shape(shapes)
