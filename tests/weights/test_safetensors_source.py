"""SafetensorsSource: checkpoint keys -> HF v5 names (transformers' own renames), per-expert parts, damage."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from ktinject import WeightError
from ktinject.weights import SafetensorsSource


def bound(model, path) -> SafetensorsSource:
    source = SafetensorsSource(path)
    with init_empty_weights(include_buffers=False):
        source.bind(AutoModelForCausalLM.from_config(model.config))
    return source


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    model = tiny_model("qwen3_moe")
    path = tmp_path_factory.mktemp("st") / "qwen"
    model.save_pretrained(path, max_shard_size="40KB")  # several shards and an index
    return model, path


def test_sharded_checkpoint_serves_every_hf_tensor(qwen_dir):
    model, path = qwen_dir
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 2
    source = bound(model, path)
    assert len(source.paths) == len(list(path.glob("*.safetensors")))
    assert set(source.names()) == set(model.state_dict())
    for name, expected in model.state_dict().items():
        assert torch.equal(source.tensor(name), expected), name


def test_per_expert_keys_are_the_parts_of_the_fused_tensors(qwen_dir):
    model, path = qwen_dir
    source = bound(model, path)
    parts = source.parts("model.layers.0.mlp.experts.gate_up_proj")
    names = [p.stored_name for p in parts]
    assert names == [f"model.layers.0.mlp.experts.{e}.gate_proj.weight" for e in range(8)] + [
        f"model.layers.0.mlp.experts.{e}.up_proj.weight" for e in range(8)
    ]
    assert all(p.ggml_type is None and p.data.dtype == np.float32 and p.shape == (16, 32) for p in parts)
    down = source.parts("model.layers.0.mlp.experts.down_proj")
    assert [p.stored_name for p in down] == [f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(8)]
    info = source.info("model.layers.0.mlp.experts.gate_up_proj")
    assert info.shape == (8, 32, 32) and info.stored_type == "F32" and info.stored_bytes == 16 * 16 * 32 * 4


def test_mixtral_legacy_names_map_through_transformers_conversions(tmp_path):
    model = tiny_model("mixtral", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    source = bound(model, tmp_path)
    parts = source.parts("model.layers.1.mlp.experts.gate_up_proj")
    assert [p.stored_name for p in parts][:5] == [
        f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight" for e in range(4)
    ] + ["model.layers.1.block_sparse_moe.experts.0.w3.weight"]
    assert (
        parts[0].ggml_type == 30 and parts[0].data.dtype == np.uint8 and parts[0].data.shape == (16, 64)
    )  # bf16 bytes
    assert (
        source.stored_rows("model.layers.1.mlp.gate.weight").stored_name
        == "model.layers.1.block_sparse_moe.gate.weight"
    )
    fused = source.tensor("model.layers.1.mlp.experts.gate_up_proj")
    assert fused.dtype == torch.bfloat16 and torch.equal(
        fused, model.state_dict()["model.layers.1.mlp.experts.gate_up_proj"]
    )


def test_missing_expert_is_named(tmp_path):
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    source = bound(model, tmp_path)
    assert source.check("model.layers.2.mlp.experts.gate_up_proj", (8, 32, 32), dequantize=True) == (
        "missing per-expert tensors model.layers.2.mlp.experts.5.up_proj.weight"
    )


def test_index_naming_a_missing_shard(qwen_dir, tmp_path):
    _, path = qwen_dir
    index = json.loads((path / "model.safetensors.index.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        WeightError, match=r"model\.safetensors\.index\.json lists shards that do not exist: model-00001-of-"
    ):
        SafetensorsSource(tmp_path)


def test_truncated_file_is_a_clear_error(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:5000])
    with pytest.raises(
        WeightError,
        match=r"model\.safetensors: cannot read the safetensors file \(.*\); the file is truncated or corrupt",
    ):
        SafetensorsSource(tmp_path)


def test_directory_without_weights(tmp_path):
    with pytest.raises(WeightError, match=r"has no \*\.safetensors files \(give gguf=\.\.\. to load a GGUF instead\)"):
        SafetensorsSource(tmp_path)


def write_index(directory, weight_map) -> None:
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize(
    "content, message",
    [
        (
            {"metadata": {}, "weight_map": ["model-00001.safetensors"]},
            r"weight_map must be an object of tensor name -> shard file, found a list",
        ),
        ({"weight_map": {"lm_head.weight": 3}}, r"weight_map\['lm_head\.weight'\] must be a shard file name, found 3"),
        (["weight_map"], r"not a safetensors index \(expected a JSON object with a \"weight_map\" key, found list\)"),
        (
            {"metadata": {}},
            r"not a safetensors index \(expected a JSON object with a \"weight_map\" key, found dict without weight_map\)",
        ),
        ({"weight_map": {}}, r"weight_map is empty \(no shards\)"),
    ],
)
def test_index_of_the_wrong_shape(tmp_path, content, message):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(content))
    with pytest.raises(WeightError, match=rf"model\.safetensors\.index\.json: {message}"):
        SafetensorsSource(tmp_path)


def test_index_that_is_not_json(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("[" * 100000)
    with pytest.raises(
        WeightError,
        match=r"model\.safetensors\.index\.json: not a safetensors index \((JSONDecodeError|RecursionError)",
    ):
        SafetensorsSource(tmp_path)


@pytest.mark.parametrize(
    "shard", ["../../x.safetensors", "../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"]
)
def test_shard_outside_the_checkpoint_is_refused(tmp_path, shard):
    checkpoint = tmp_path / "a" / "b"
    checkpoint.mkdir(parents=True)
    tiny_model("llama").save_pretrained(tmp_path / "a")  # a real file one level up: must not be opened
    (tmp_path / "a" / "outside.safetensors").write_bytes((tmp_path / "a" / "model.safetensors").read_bytes())
    write_index(checkpoint, {"lm_head.weight": shard})
    with pytest.raises(
        WeightError,
        match=rf"model\.safetensors\.index\.json: shard '{re.escape(shard)}' is not a file name "
        r"inside .*b \(absolute paths and '\.\.' are refused",
    ):
        SafetensorsSource(checkpoint)


def test_shards_linked_into_a_blob_store_load(tmp_path, qwen_dir):
    """A hub cache keeps snapshots as links into ../../blobs: the links are the owner's choice, not the index's."""
    model, path = qwen_dir
    snapshot, blobs = tmp_path / "snapshots" / "abc", tmp_path / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in path.iterdir():
        (blobs / file.name).write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(blobs / file.name)
    source = bound(model, snapshot)
    assert torch.equal(source.tensor("model.norm.weight"), model.state_dict()["model.norm.weight"])


def test_index_naming_a_tensor_no_shard_has(qwen_dir, tmp_path):
    _, path = qwen_dir
    for file in path.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.layers.9.mlp.gate.weight"] = shard
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        WeightError,
        match=rf"model\.safetensors\.index\.json: tensor model\.layers\.9\.mlp\.gate\.weight is listed "
        rf"in {shard}, but no shard has it",
    ):
        SafetensorsSource(tmp_path)


@pytest.mark.parametrize(
    "header", [b"\xff" * 8, (10**6).to_bytes(8, "little") + b"{", (20).to_bytes(8, "little") + b'{"a": {"dtype": 1}}  ']
)
def test_corrupt_header_is_a_clear_error(tmp_path, header):
    tiny_model("llama").save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(header + data[len(header) :])
    with pytest.raises(
        WeightError,
        match=r"model\.safetensors: cannot read the safetensors file \(.*\); the file is truncated or corrupt",
    ):
        SafetensorsSource(tmp_path)
