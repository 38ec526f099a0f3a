"""A tiny valid Qwen3-MoE GGUF (Q8_0 matrices, F32 vectors: every row a multiple of 32, so no type falls back to
F16) and a fresh copy of it per test to damage, shared by the reader and metadata check tests."""

from __future__ import annotations

import shutil

import pytest
from gguf_writer import write_gguf
from tiny_models import tiny_model

SIZES = dict(num_hidden_layers=2, mlp_only_layers=[], moe_intermediate_size=32, num_experts=4, eos_token_id=1)


def q8_types(name: str, shape: tuple[int, ...]) -> str:
    return "f32" if len(shape) <= 1 else "q8_0"


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    path = tmp_path_factory.mktemp("intact") / "m.gguf"
    write_gguf(tiny_model("qwen3_moe", **SIZES), path, types=q8_types)
    return path


@pytest.fixture()
def damaged(intact, tmp_path):
    path = tmp_path / "damaged.gguf"
    shutil.copy(intact, path)
    return path
