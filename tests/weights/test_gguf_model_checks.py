"""The metadata that shapes the model is checked against its type, its range and the tensors of the file: each
bad value is a WeightError naming the file and the key (or tensor), raised before transformers builds anything."""

from __future__ import annotations

import logging
import re
import shutil

import pytest
import torch
from gguf_bytes import patch, put, set_metadata
from gguf_writer import write_gguf
from tiny_models import tiny_model

from ktinject import WeightError
from ktinject.weights import GGUFSource
from ktinject.weights.gguf_config import config_from_gguf


def config_of(path):
    return config_from_gguf(GGUFSource(path))


def test_intact_metadata_passes(intact):
    config = config_of(intact)
    assert (config.num_hidden_layers, config.num_experts, config.num_experts_per_tok, config.rms_norm_eps) == (
        2,
        4,
        2,
        1e-6,
    )
    assert not config.tie_word_embeddings


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "qwen3moe.block_count",
            1,
            r"GGUF metadata key qwen3moe\.block_count is 1, but the file has tensors of block 1 "
            r"\(blk\.1\.attn_q\.weight\); blocks are numbered 0 to 0",
        ),
        (
            "qwen3moe.block_count",
            3,
            r"GGUF metadata key qwen3moe\.block_count is 3, but the file has no tensors of blk\.2$",
        ),
        (
            "qwen3moe.block_count",
            2**32 - 1,
            r"GGUF metadata key qwen3moe\.block_count is 4294967295, but the file has no tensors of blk\.2, blk\.3, "
            r"blk\.4, blk\.5 and 4294967289 more",
        ),
        (
            "qwen3moe.expert_used_count",
            0,
            r"GGUF metadata key qwen3moe\.expert_used_count is 0 \(UINT32\), expected an integer >= 1",
        ),
        (
            "qwen3moe.expert_used_count",
            5,
            r"qwen3moe\.expert_used_count is 5, more than the 4 experts of qwen3moe\.expert_count",
        ),
        (
            "qwen3moe.attention.layer_norm_rms_epsilon",
            float("nan"),
            r"GGUF metadata key qwen3moe\.attention\.layer_norm_rms_epsilon "
            r"is nan \(FLOAT32\), expected a finite number > 0",
        ),
        (
            "qwen3moe.attention.layer_norm_rms_epsilon",
            -1e-6,
            r"GGUF metadata key qwen3moe\.attention\.layer_norm_rms_epsilon is -1e-06 \(FLOAT32\), expected a finite number > 0",
        ),
        (
            "qwen3moe.attention.layer_norm_rms_epsilon",
            float("inf"),
            r"GGUF metadata key qwen3moe\.attention\.layer_norm_rms_epsilon is inf \(FLOAT32\)",
        ),
        (
            "qwen3moe.attention.head_count",
            0,
            r"GGUF metadata key qwen3moe\.attention\.head_count is 0 \(UINT32\), expected an integer >= 1",
        ),
        (
            "qwen3moe.attention.head_count_kv",
            3,
            r"qwen3moe\.attention\.head_count is 4, which qwen3moe\.attention\.head_count_kv = 3 "
            r"does not divide",
        ),
        (
            "qwen3moe.attention.value_length",
            16,
            r"qwen3moe\.attention\.value_length is 16, but qwen3moe\.attention\.key_length is 8; "
            r"qwen3_moe models have one head size for keys and values",
        ),
        (
            "qwen3moe.expert_count",
            2**31,
            r"qwen3moe\.expert_count is 2147483648, but tensor blk\.0\.ffn_gate_exps\.weight has shape "
            r"\(4, 32, 32\) \(4 experts along its first axis\)",
        ),
        (
            "qwen3moe.vocab_size",
            97,
            r"tensor token_embd\.weight has shape \(96, 32\): 96 tokens, but qwen3moe\.vocab_size is 97",
        ),
        (
            "qwen3moe.embedding_length",
            33,
            r"tensor token_embd\.weight has shape \(96, 32\), but qwen3moe\.embedding_length is 33",
        ),
        (
            "tokenizer.ggml.eos_token_id",
            96,
            r"GGUF metadata key tokenizer\.ggml\.eos_token_id is 96 \(UINT32\), expected an integer <= 95",
        ),
    ],
)
def test_bad_value_is_named(damaged, key, value, message):
    set_metadata(damaged, key, value)
    with pytest.raises(WeightError, match=rf"^{damaged}: {message}"):
        config_of(damaged)


@pytest.mark.parametrize(
    "key, value, shown",
    [
        (
            "qwen3moe.attention.head_count",
            2**31,
            r"model\.layers\.0\.self_attn\.q_proj\.weight: shape mismatch: the file gives "
            r"\(32, 32\) \(from blk\.0\.attn_q\.weight \(32, 32\)\), the model expects \(17179869184, 32\)",
        ),
        (
            "qwen3moe.expert_feed_forward_length",
            2**31,
            r"model\.layers\.0\.mlp\.experts\.down_proj: shape mismatch: .* the model "
            r"expects \(4, 32, 2147483648\)",
        ),
    ],
)
def test_huge_sizes_are_refused_before_any_allocation(damaged, monkeypatch, key, value, shown):
    set_metadata(damaged, key, value)
    real_empty = torch.empty

    def no_big_tensors(*size, **kwargs):  # transformers creates parameters with torch.empty before moving them to meta
        tensor = real_empty(*size, **kwargs)
        assert tensor.is_meta or tensor.numel() < 2**24, f"allocated {tuple(tensor.shape)}"
        return tensor

    monkeypatch.setattr(torch, "empty", no_big_tensors)
    with pytest.raises(WeightError) as info:
        config_of(damaged)
    message = str(info.value)
    assert message.startswith(f"{damaged}: the GGUF metadata describes a model whose tensors do not match the file's")
    assert any(re.fullmatch("  " + shown, line) for line in message.splitlines()), message


def test_wrong_value_type_is_named(damaged):
    patch(
        damaged, lambda data, layout: put(data, layout.kv("qwen3moe.attention.layer_norm_rms_epsilon")[2], 4)
    )  # -> UINT32
    with pytest.raises(
        WeightError,
        match=rf"^{damaged}: GGUF metadata key qwen3moe\.attention\.layer_norm_rms_epsilon is "
        r"\d+ \(UINT32\), expected a float",
    ):
        config_of(damaged)


def test_invalid_utf8_in_a_string_value(damaged):
    patch(damaged, lambda data, layout: data.__setitem__(layout.kv("general.architecture")[4].offset, 0xFF))
    with pytest.raises(
        WeightError,
        match=rf"^{damaged}: GGUF metadata key general\.architecture is not valid UTF-8 "
        r"\(invalid start byte at byte 0\); the file is corrupt",
    ):
        GGUFSource(damaged)


# -- the output projection: tied only when the file has none and the architecture ties -----------------
def test_missing_output_of_an_architecture_that_never_ties(tmp_path):
    path = write_gguf(tiny_model("deepseek_v3"), tmp_path / "ds.gguf", skip=lambda name: name == "output.weight")[0]
    with pytest.raises(
        WeightError,
        match=rf"^{path}: tensor output\.weight is missing; deepseek2 models have their own output "
        r"projection \(only glm4moe, llama, qwen2, qwen2moe, qwen3, qwen3moe files may leave "
        r"it out to tie it to token_embd\.weight\)",
    ):
        config_of(path)


def test_missing_output_of_a_tying_moe_architecture_ties_with_a_warning(tmp_path, caplog):
    path = write_gguf(
        tiny_model("qwen3_moe", mlp_only_layers=[]), tmp_path / "q.gguf", skip=lambda name: name == "output.weight"
    )[0]
    with caplog.at_level(logging.INFO, logger="ktinject"):
        config = config_of(path)
    assert config.tie_word_embeddings
    assert [(r.levelname, r.getMessage()) for r in caplog.records if "output.weight" in r.getMessage()] == [
        ("WARNING", f"{path}: no output.weight; lm_head is tied to token_embd.weight (as llama.cpp does for qwen3moe)")
    ]


def test_dense_model_ties_quietly(tmp_path, caplog):
    path = write_gguf(tiny_model("llama", tie_word_embeddings=True), tmp_path / "l.gguf")[0]
    with caplog.at_level(logging.WARNING, logger="ktinject"):
        assert config_of(path).tie_word_embeddings
    assert not caplog.records


# -- group-limited routing (DeepSeek-V3, GLM-4-MoE) --------------------------------------------------
@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    return write_gguf(tiny_model("deepseek_v3"), tmp_path_factory.mktemp("ds") / "ds.gguf")[0]


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "deepseek2.expert_group_count",
            3,
            r"deepseek2\.expert_group_count is 3, which does not split the 8 experts into equal "
            r"groups of at least 2",
        ),
        (
            "deepseek2.expert_group_used_count",
            3,
            r"deepseek2\.expert_group_used_count is 3, more than the 2 groups of "
            r"deepseek2\.expert_group_count",
        ),
        (
            "deepseek2.expert_used_count",
            5,
            r"deepseek2\.expert_used_count is 5, more than the 4 experts in the 1 groups routing may "
            r"pick \(deepseek2\.expert_group_used_count\)",
        ),
        (
            "deepseek2.leading_dense_block_count",
            4,
            r"deepseek2\.leading_dense_block_count is 4, more than the 3 layers",
        ),
        (
            "deepseek2.rope.dimension_count",
            8,
            r"GGUF metadata key deepseek2\.attention\.key_length_mla is 8, but the key head must be "
            r"longer than its rope part \(deepseek2\.rope\.dimension_count is 8\)",
        ),
    ],
)
def test_grouped_routing(deepseek, tmp_path, key, value, message):
    path = tmp_path / "ds.gguf"
    shutil.copy(deepseek, path)
    set_metadata(path, key, value)
    with pytest.raises(WeightError, match=rf"^{path}: {message}"):
        config_of(path)


def test_tensors_the_described_model_does_not_use_are_named_in_a_warning(tmp_path, caplog):
    # GLM files keep their next-token-prediction layers as the last blocks; the model does not use them.
    path = write_gguf(tiny_model("glm4_moe"), tmp_path / "glm.gguf")[0]
    set_metadata(path, "glm4moe.nextn_predict_layers", 1)
    last_block = sorted(n for n in GGUFSource(path).stored_names() if n.startswith("blk.1."))
    with caplog.at_level(logging.WARNING, logger="ktinject"):
        assert config_of(path).num_hidden_layers == 1
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(
        f"{path}: {len(last_block)} tensors of the file are not used by the glm4_moe model its "
        "metadata describes: blk.1."
    )
    assert message.endswith(f" and {len(last_block) - 6} more")
