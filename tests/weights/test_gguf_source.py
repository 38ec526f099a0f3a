"""GGUFSource: HF names over GGUF tensors, raw parts as stored (zero-copy), dequantization, splits, damage."""

from __future__ import annotations

import mmap

import gguf
import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from gguf_writer import KQUANT_SIZES, dequantized_tensors, kquant_types, write_gguf
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from ktinject import WeightError
from ktinject.weights import GGUFSource, RawTensor, WeightSource, layouts

Q = gguf.GGMLQuantizationType


def meta_twin(model):
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(model.config)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    model = tiny_model("qwen3_moe", **KQUANT_SIZES["qwen3_moe"])
    path = tmp_path_factory.mktemp("gguf") / "qwen.gguf"
    files = write_gguf(model, path, types=kquant_types)
    source = GGUFSource(path)
    source.bind(meta_twin(model))
    return model, files, source


def mapped(array: np.ndarray) -> bool:
    """True when ``array`` is a view into a memory-mapped file."""
    while array is not None:
        if isinstance(array, np.memmap) or isinstance(getattr(array, "base", None), mmap.mmap):
            return True
        array = array.base if isinstance(array, np.ndarray) else None
    return False


def test_is_a_weight_source_with_hf_names(qwen):
    model, _, source = qwen
    assert isinstance(source, WeightSource)
    assert set(source.names()) == set(model.state_dict())
    info = source.info("model.layers.0.mlp.experts.gate_up_proj")
    assert info.shape == (4, 512, 256) and info.stored_type == "Q4_K"
    assert info.stored_bytes == 2 * 4 * 256 * 144  # gate and up: 4 experts x 256 rows x one Q4_K block
    assert source.info("model.layers.0.mlp.experts.down_proj").stored_type == "Q6_K"


def test_fused_experts_parts_are_the_stored_blocks(qwen):
    _, _, source = qwen
    parts = source.parts("model.layers.1.mlp.experts.gate_up_proj")
    assert [p.stored_name for p in parts] == ["blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight"]
    row_bytes = 256 // 256 * 144  # one Q4_K block of 256 values per row
    for part in parts:
        assert isinstance(part, RawTensor)
        assert part.ggml_type == Q.Q4_K and part.type_id == Q.Q4_K
        assert part.shape == (4, 256, 256)  # (E, I, H) in HF/numpy order
        assert part.data.dtype == np.uint8 and part.data.shape == (4, 256, row_bytes)
        assert mapped(part.data)  # a view of the file, not a copy
    before = parts[0].data.copy()
    source.release()  # pages leave RSS; the views read the file again
    assert np.array_equal(parts[0].data, before)
    (down,) = source.parts("model.layers.1.mlp.experts.down_proj")
    assert down.stored_name == "blk.1.ffn_down_exps.weight" and down.ggml_type == Q.Q6_K and down.shape == (4, 256, 256)
    assert down.data.shape == (4, 256, 210)


def test_float_parts_are_typed_arrays(qwen):
    _, _, source = qwen
    (norm,) = source.parts("model.norm.weight")
    assert norm.ggml_type == Q.F32 and norm.data.dtype == np.float32 and norm.data.shape == (256,)
    (embed,) = source.parts("model.embed_tokens.weight")
    assert embed.ggml_type == Q.F16 and embed.data.dtype == np.float16 and embed.type_id == Q.F16
    assert source.stored_rows("model.embed_tokens.weight").stored_name == "token_embd.weight"


def test_stored_rows_of_a_multi_part_tensor_is_none(qwen):
    _, _, source = qwen
    assert source.stored_rows("model.layers.0.mlp.experts.gate_up_proj") is None  # gate and up: use parts()


def test_tensor_is_gguf_py_dequantization_in_hf_layout(qwen, monkeypatch):
    _, files, source = qwen
    decoded = dequantized_tensors(files)
    monkeypatch.setattr(layouts, "CHUNK_BYTES", 3 * 256 * 256 * 4)  # 3 experts per chunk: chunk edges inside parts
    gate_up = source.tensor("model.layers.0.mlp.experts.gate_up_proj")
    assert gate_up.dtype == torch.float32 and gate_up.shape == (4, 512, 256)
    expected = torch.cat([decoded["blk.0.ffn_gate_exps.weight"], decoded["blk.0.ffn_up_exps.weight"]], dim=1)
    assert torch.equal(gate_up, expected)
    again = source.tensor(
        "model.layers.0.mlp.experts.gate_up_proj", dtype=torch.bfloat16
    )  # pages were dropped: still valid
    assert again.dtype == torch.bfloat16 and torch.equal(again, expected.to(torch.bfloat16))
    assert source.tensor("model.embed_tokens.weight").dtype == torch.float16  # float types keep theirs by default


def test_progress_callback_counts_stored_bytes(qwen):
    _, _, source = qwen
    seen = []
    source.on_bytes = seen.append
    try:
        source.tensor("model.layers.0.mlp.experts.down_proj")
    finally:
        source.on_bytes = None
    assert sum(seen) == source.stored("blk.0.ffn_down_exps.weight").nbytes == 4 * 256 * 210


def test_check_reports_missing_shape_and_unknown_names(qwen):
    _, _, source = qwen
    assert source.check("model.layers.0.mlp.experts.gate_up_proj", (4, 512, 256), dequantize=True) is None
    problem = source.check("model.layers.0.mlp.experts.gate_up_proj", (4, 64, 256), dequantize=True)
    assert problem.startswith(
        "shape mismatch: the file gives (4, 512, 256) (from blk.0.ffn_gate_exps.weight (4, 256, 256)"
    )
    assert "the model expects (4, 64, 256)" in problem
    assert "has no GGUF name" in source.check("model.layers.0.mlp.nonsense.weight", None, dequantize=True)


def test_split_files_read_as_one(tmp_path):
    model = tiny_model("mixtral")
    files = write_gguf(model, tmp_path / "mix.gguf", split_max_tensors=8)
    assert len(files) >= 3 and files[1].name.endswith(f"-00002-of-{len(files):05d}.gguf")
    for given in (files[0], files[-1]):
        source = GGUFSource(given)
        assert source.paths == files
        source.bind(meta_twin(model))
        # attn_q of the llama architecture has llama.cpp's rope row order: the source undoes it
        assert torch.equal(
            source.tensor("model.layers.1.self_attn.q_proj.weight", torch.float32),
            model.state_dict()["model.layers.1.self_attn.q_proj.weight"].half().float(),
        )


def test_missing_split_is_named(tmp_path):
    files = write_gguf(tiny_model("mixtral"), tmp_path / "mix.gguf", split_max_tensors=8)
    files[1].unlink()
    with pytest.raises(
        WeightError, match=rf"split GGUF of {len(files)} files, but mix-00002-of-0000{len(files)}.gguf is missing"
    ):
        GGUFSource(files[0])


@pytest.fixture()
def small_file(tmp_path):
    return write_gguf(tiny_model("qwen2_moe"), tmp_path / "small.gguf")[0]


def test_truncated_data_is_a_clear_error(small_file):
    data = small_file.read_bytes()
    small_file.write_bytes(data[: int(len(data) * 0.7)])
    with pytest.raises(
        WeightError,
        match=rf"{small_file}: tensor blk\.\d+\.\w+\.weight \(\w+, shape \[[\d, ]+\]\) ends at "
        rf"byte \d+ but the file has {int(len(data) * 0.7)} bytes; the file is truncated",
    ):
        GGUFSource(small_file)


@pytest.mark.parametrize("cut", [30, 400, 2000])
def test_truncated_header_is_a_clear_error(small_file, cut):
    small_file.write_bytes(small_file.read_bytes()[:cut])
    with pytest.raises(WeightError, match=rf"{small_file}: .*(truncated|corrupt)"):
        GGUFSource(small_file)


def test_corrupt_header_is_a_clear_error(small_file):
    data = bytearray(small_file.read_bytes())
    data[8:16] = (2**40).to_bytes(8, "little")  # tensor count
    data[16:24] = (2**40).to_bytes(8, "little")  # metadata count
    small_file.write_bytes(bytes(data))
    with pytest.raises(WeightError, match="truncated or corrupt"):
        GGUFSource(small_file)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(WeightError, match=r"not a GGUF file \(starts with b'PK\\x03\\x04', expected b'GGUF'\)"):
        GGUFSource(path)
    path.write_bytes(b"")
    with pytest.raises(WeightError, match=r"not a GGUF file \(0 bytes"):
        GGUFSource(path)
    with pytest.raises(WeightError, match="GGUF file not found"):
        GGUFSource(tmp_path / "absent.gguf")


def test_split_keys_must_agree_with_the_files(tmp_path):
    from gguf_bytes import set_metadata

    files = write_gguf(tiny_model("mixtral"), tmp_path / "mix.gguf", split_max_tensors=8)
    set_metadata(files[1], "split.tensors.count", 22)
    with pytest.raises(
        WeightError,
        match=rf"^{files[1]}: GGUF metadata key split\.tensors\.count is 22, but the {len(files)} files "
        r"hold 23 tensors; a tensor count or index is wrong",
    ):
        GGUFSource(files[0])
    set_metadata(files[1], "split.tensors.count", 23)
    set_metadata(files[2], "split.no", 1)
    with pytest.raises(
        WeightError, match=rf"^{files[2]}: GGUF metadata key split\.no is 1, but the file is split 3 of 3"
    ):
        GGUFSource(files[0])
