"""The GGUF tensor index is checked as llama.cpp checks it: each way of damaging it is a WeightError naming the
file and the tensor, never weights read from the wrong bytes."""

from __future__ import annotations

import gguf
import pytest
from gguf_bytes import Part, patch, put, set_header, set_tensor_field, tensor_field

from ktinject import WeightError
from ktinject.weights import GGUFSource
from ktinject.weights.gguf_reader import open_gguf

Q = gguf.GGMLQuantizationType


def test_intact_file_passes(intact):
    reader = open_gguf(intact)
    assert len(reader.tensors) == 27 and reader.tensors[0].name == "token_embd.weight"


@pytest.mark.parametrize(
    "tensor, new_type, message",
    [
        # a larger type: the next tensor's offset lies inside this one
        (
            "token_embd.weight",
            Q.F16,
            r"tensor blk\.0\.attn_q\.weight \(Q8_0, shape \[32, 32\]\): data offset 3264 overlaps "
            r"tensor token_embd\.weight; after token_embd\.weight \(F16, 6144 bytes at offset 0\) the "
            r"next tensor starts at 6144 \(sizes padded to 32 bytes\): a tensor's type, shape or offset is wrong",
        ),
        (
            "blk.0.ffn_gate_exps.weight",
            Q.F32,
            r"tensor blk\.0\.ffn_up_exps\.weight .*overlaps tensor blk\.0\.ffn_gate_exps\.weight; "
            r"after blk\.0\.ffn_gate_exps\.weight \(F32, 16384 bytes",
        ),
        (
            "blk.1.ffn_up_exps.weight",
            Q.F16,
            r"tensor blk\.1\.ffn_down_exps\.weight .*overlaps tensor blk\.1\.ffn_up_exps\.weight; after blk\.1\.ffn_up_exps\.weight \(F16, 8192 bytes",
        ),
        # a type whose blocks do not fit the rows
        (
            "blk.0.ffn_gate_exps.weight",
            Q.Q5_K,
            r"tensor blk\.0\.ffn_gate_exps\.weight: rows of 32 values do not split into Q5_K blocks of 256",
        ),
        # a smaller type: a gap before the next tensor
        (
            "blk.1.ffn_down_exps.weight",
            Q.Q4_0,
            r"tensor blk\.1\.ffn_gate_inp\.weight .*data offset \d+ leaves a gap; after "
            r"blk\.1\.ffn_down_exps\.weight \(Q4_0, 2304 bytes at offset \d+\)",
        ),
        # smaller, but still inside its 32-byte slot: only the padding shows it
        (
            "blk.0.attn_k_norm.weight",
            Q.F16,
            r"tensor blk\.0\.attn_k_norm\.weight \(F16, shape \[8\], 16 bytes\): the 16 padding "
            r"bytes after its data are not zeros; its type or shape does not describe the data",
        ),
        ("blk.0.attn_q.weight", 99, r"tensor blk\.0\.attn_q\.weight: GGML type 99 is not a type gguf-py knows"),
    ],
)
def test_changed_type_is_named(damaged, tensor, new_type, message):
    set_tensor_field(damaged, tensor, "type", int(new_type))
    with pytest.raises(WeightError, match=rf"^{damaged}: {message}"):
        GGUFSource(damaged)


@pytest.mark.parametrize(
    "shift, message",
    [
        (1, r"tensor blk\.0\.attn_v\.weight: data offset 4897 is not a multiple of the alignment 32"),
        (
            32,
            r"tensor blk\.0\.attn_v\.weight \(Q8_0, shape \[32, 16\]\): data offset 4928 leaves a gap; after "
            r"blk\.0\.attn_k\.weight \(Q8_0, 544 bytes at offset 4352\) the next tensor starts at 4896",
        ),
        (-32, r"tensor blk\.0\.attn_v\.weight .*: data offset 4864 overlaps tensor blk\.0\.attn_k\.weight"),
    ],
)
def test_shifted_offset_is_named(damaged, shift, message):
    old = tensor_field(damaged, "blk.0.attn_v.weight", "offset")
    set_tensor_field(damaged, "blk.0.attn_v.weight", "offset", old + shift)
    with pytest.raises(WeightError, match=rf"^{damaged}: {message}"):
        GGUFSource(damaged)


def test_offset_of_another_tensor_is_named(damaged):
    other = tensor_field(damaged, "blk.0.ffn_up_exps.weight", "offset")
    set_tensor_field(damaged, "blk.1.ffn_up_exps.weight", "offset", other)
    with pytest.raises(
        WeightError,
        match=rf"^{damaged}: tensor blk\.1\.ffn_up_exps\.weight .*data offset {other} overlaps "
        r"tensor blk\.0\.ffn_up_exps\.weight; after blk\.1\.ffn_gate_exps\.weight",
    ):
        GGUFSource(damaged)


def test_tensor_count_lowered_by_one(damaged):
    set_header(damaged, "n_tensors", 26)
    with pytest.raises(
        WeightError,
        match=rf"^{damaged}: the \d+ bytes between the end of the tensor index \(byte \d+\) and the "
        r"tensor data are not zeros; the tensor count \(26\) or the index is wrong",
    ):
        GGUFSource(damaged)


def test_bytes_after_the_last_tensor(damaged):
    damaged.write_bytes(damaged.read_bytes() + bytes(32))
    with pytest.raises(
        WeightError,
        match=rf"^{damaged}: 32 bytes follow the data of the last tensor \(output\.weight\); "
        r"the tensor count \(27\) or the tensor index is wrong",
    ):
        GGUFSource(damaged)


def test_data_past_the_end_is_named(damaged):
    set_tensor_field(damaged, "output.weight", "type", int(Q.F32))
    with pytest.raises(
        WeightError,
        match=rf"^{damaged}: tensor output\.weight \(F32, shape \[32, 96\]\) ends at byte \d+ but the "
        r"file has \d+ bytes; the file is truncated or the index is corrupt",
    ):
        GGUFSource(damaged)


@pytest.mark.parametrize(
    "dims, message",
    [
        ((32, 2**63), r"dimension 9223372036854775808 is negative as a signed 64-bit number"),
        ((2**32, 2**32), r"shape \[4294967296, 4294967296\] has more than 2\*\*63 elements"),
    ],
)
def test_impossible_dimensions(damaged, dims, message):
    def edit(data: bytearray, layout) -> None:
        offset = layout.tensor("blk.0.attn_q.weight")[3].offset
        for i, d in enumerate(dims):
            put(data, Part(offset + 8 * i, 8, "uint64"), d)

    patch(damaged, edit)
    with pytest.raises(WeightError, match=rf"^{damaged}: tensor blk\.0\.attn_q\.weight: {message}"):
        GGUFSource(damaged)


def test_huge_array_length_is_refused_without_looping(tmp_path):
    path = tmp_path / "x.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_token_list([f"t{i}" for i in range(50)])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    patch(path, lambda data, layout: put(data, layout.kv("tokenizer.ggml.tokens")[4], 2**62))
    with pytest.raises(
        WeightError,
        match=rf"^{path}: an array at byte \d+ claims 4611686018427387904 items, but only \d+ bytes "
        r"follow; the file is truncated or corrupt",
    ):
        GGUFSource(path)


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "n_kv",
            2**40,
            r"the header counts 1099511627776 metadata key/value pairs, but only \d+ bytes follow \(each takes at "
            r"least 13\); the file is truncated or corrupt",
        ),
        ("n_tensors", 2**40, r"(the header counts 1099511627776 tensors, but only \d+ bytes follow|past the end)"),
        ("version", 7, r"cannot read the GGUF header and tensor index \(ValueError: .*version 7"),
    ],
)
def test_header_counts(damaged, field, value, message):
    set_header(damaged, field, value)
    with pytest.raises(WeightError, match=rf"^{damaged}: {message}"):
        GGUFSource(damaged)


def test_invalid_utf8_in_a_tensor_name(damaged):
    patch(damaged, lambda data, layout: data.__setitem__(layout.tensor("blk.0.attn_q.weight")[1].offset, 0xFF))
    with pytest.raises(
        WeightError,
        match=rf"^{damaged}: a metadata key or tensor name is not valid UTF-8 \(invalid start byte "
        r"at byte 0 of b'\\xffl",
    ):
        GGUFSource(damaged)


def test_damaged_tensor_name_is_not_taken_for_an_absent_tensor(damaged):
    patch(damaged, lambda data, layout: data.__setitem__(layout.tensor("output.weight")[1].offset + 3, ord("x")))
    with pytest.raises(
        WeightError,
        match=rf"^{damaged}: tensor 'outxut\.weight' is not a tensor of the qwen3moe architecture "
        r"in gguf-py [\d.]+ \(a damaged name, or a file newer than gguf-py\)",
    ):
        GGUFSource(damaged)
