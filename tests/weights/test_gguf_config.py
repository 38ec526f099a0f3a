"""A config from GGUF metadata alone: every family with built-in rules round-trips through the writer."""

from __future__ import annotations

import pytest
from gguf_writer import write_gguf
from tiny_models import FAMILIES, tiny_model

from ktinject import WeightError
from ktinject.weights import GGUFSource
from ktinject.weights.gguf_config import config_from_gguf

# Fields a GGUF cannot carry (or that do not change the model) are left out of the comparison.
IGNORED = {
    "transformers_version",
    "architectures",
    "dtype",
    "initializer_range",
    "head_dim",
    "num_nextn_predict_layers",
    "router_aux_loss_coef",
    "output_router_logits",
    "use_cache",
    "attention_dropout",
    "max_window_layers",
    "use_sliding_window",
    "pretraining_tp",
    "router_jitter_noise",
    "qk_head_dim",
    "rope_interleave",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trips_through_gguf_metadata(family, tmp_path):
    overrides = {"mlp_only_layers": []} if family == "qwen3_moe" else {}
    original = tiny_model(family, **overrides).config
    path = write_gguf(tiny_model(family, **overrides), tmp_path / "m.gguf")[0]
    config = config_from_gguf(GGUFSource(path))
    assert config.model_type == family
    for key, value in original.to_diff_dict().items():
        if key not in IGNORED and value is not None:
            assert getattr(config, key) == value, key
    head_dim = getattr(original, "head_dim", None) or original.hidden_size // original.num_attention_heads
    assert (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads) == head_dim


def test_unknown_architecture_says_what_is_supported(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "x.gguf", "bert")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with pytest.raises(
        WeightError,
        match=r"x\.gguf: cannot build a config for GGUF architecture 'bert' .*supported: .*qwen3moe.*pass the model directory",
    ):
        config_from_gguf(GGUFSource(tmp_path / "x.gguf"))


def test_missing_metadata_key_is_named(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "x.gguf", "qwen3moe")
    writer.add_embedding_length(32)
    writer.add_head_count(4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with pytest.raises(
        WeightError,
        match=r"x\.gguf: GGUF metadata key qwen3moe\.block_count is missing \(needed for the qwen3_moe config\)",
    ):
        config_from_gguf(GGUFSource(tmp_path / "x.gguf"))
