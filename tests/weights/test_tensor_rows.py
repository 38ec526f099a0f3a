"""FileSource.tensor_rows: a few experts of a stacked experts tensor, read without assembling the rest.

Every experts layout a source produces (per-expert checkpoint tensors stacked, GGUF gate/up concatenated,
GPT-OSS interleaved and transposed) gives exactly the rows of the whole tensor, and reads only the stored
rows it needs (counted with the progress callback).
"""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from gguf_writer import write_gguf
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from ktinject import WeightError
from ktinject.weights import GGUFSource, SafetensorsSource


def bind(source, model):
    with init_empty_weights(include_buffers=False):
        source.bind(AutoModelForCausalLM.from_config(model.config))
    return source


def experts_names(model):
    return [
        n for n in model.state_dict() if ".mlp.experts." in n and n.endswith(("gate_up_proj", "down_proj", "_bias"))
    ]


@pytest.mark.parametrize(
    "family, fmt",
    [
        ("qwen3_moe", "safetensors"),
        ("qwen3_moe", "gguf"),
        ("gpt_oss", "gguf"),
        ("gpt_oss", "safetensors"),
        ("mixtral", "gguf"),
    ],
)
def test_rows_are_the_whole_tensors_rows(family, fmt, tmp_path):
    model = tiny_model(
        family, **({"mlp_only_layers": []} if family == "qwen3_moe" else {})
    )  # llama.cpp's qwen3moe: no dense layers
    if fmt == "gguf":
        source = bind(GGUFSource(write_gguf(model, tmp_path / "m.gguf", types=lambda name, shape: "f32")[0]), model)
    else:
        model.save_pretrained(tmp_path)
        source = bind(SafetensorsSource(tmp_path), model)
    names = experts_names(model)
    assert names
    for name in names:
        whole = source.tensor(name)
        experts = whole.shape[0]
        for start, stop in ((0, 1), (1, min(3, experts)), (experts - 1, experts), (0, experts)):
            assert torch.equal(source.tensor_rows(name, start, stop), whole[start:stop]), (name, start, stop)


def test_rows_read_only_their_experts(tmp_path):
    model = tiny_model("qwen3_moe")  # per-expert checkpoint tensors
    model.save_pretrained(tmp_path)
    source = bind(SafetensorsSource(tmp_path), model)
    name = next(n for n in experts_names(model) if n.endswith("gate_up_proj"))
    read = []
    source.on_bytes = read.append
    experts = model.state_dict()[name].shape[0]
    source.tensor_rows(name, 0, 2)
    two = sum(read)
    read.clear()
    source.tensor(name)
    assert two * experts == sum(read) * 2


def test_rows_out_of_range_name_the_tensor(tmp_path):
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path)
    source = bind(SafetensorsSource(tmp_path), model)
    name = experts_names(model)[0]
    with pytest.raises(WeightError, match="outside"):
        source.tensor_rows(name, 0, 10_000)


def test_parts_then_rows_count_the_bytes_once(tmp_path):
    """cpu_experts looks at the stored parts, then reads floats: the progress bar counts those bytes once."""
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path)
    source = bind(SafetensorsSource(tmp_path), model)
    name = next(n for n in experts_names(model) if n.endswith("gate_up_proj"))
    read = []
    source.on_bytes = read.append
    source.parts(name)
    handed_out = sum(read)
    experts = model.state_dict()[name].shape[0]
    for e in range(experts):
        source.tensor_rows(name, e, e + 1)
    source.tensor(name)
    assert sum(read) == handed_out == source.stored_bytes(name)
