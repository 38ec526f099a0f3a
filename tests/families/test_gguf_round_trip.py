"""A tiny GGUF of every family gguf-py has a name map for, through ``from_pretrained(gguf=)`` with ``rules="auto"``.

The model directory gives the config (saved by transformers), the GGUF the weights (float32, llama.cpp's tensor
names and stacked experts, written by ``gguf_files``); the loaded model must be the original: logits within 1e-4
and the same greedy tokens, with every experts module on ``cpu_experts`` fed the file's stored tensors.
"""

from __future__ import annotations

import pytest
import torch
from ktinject.operators.cpu_experts import CpuExperts
from ktinject.operators.experts_layout import looks_like_experts

import ktinject
from families.gguf_files import GGUF_ARCHES, NO_ROUND_TRIP, TIED, write_family_gguf
from ktinject.families.tiny import TINY_CONFIGS, tiny_model

IDS = torch.arange(3, 11)[None]


@pytest.mark.parametrize("model_type", sorted(GGUF_ARCHES))
def test_gguf_round_trip_with_auto_rules(model_type, tmp_path):
    model = tiny_model(model_type, **({"tie_word_embeddings": True} if model_type in TIED else {}))
    write_family_gguf(model, tmp_path / "m.gguf", GGUF_ARCHES[model_type])
    model.save_pretrained(tmp_path)
    loaded = ktinject.from_pretrained(
        tmp_path, gguf="m.gguf", rules="auto", vars={"gpu": "cpu"}, dtype=torch.float32, progress=False
    )
    experts = [m for m in loaded.modules() if isinstance(m, CpuExperts)]
    assert experts and not any(looks_like_experts(m) for m in loaded.modules())
    assert all(op._types == ("f32", "f32", "f32") for op in experts)  # the file's tensors, packed as stored
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=0, atol=1e-4)
        kwargs = dict(max_new_tokens=8, do_sample=False)
        assert torch.equal(loaded.generate(IDS, **kwargs), model.generate(IDS, **kwargs))


def test_every_family_has_a_round_trip_or_a_reason():
    covered = set(GGUF_ARCHES) | set(NO_ROUND_TRIP)
    assert not set(GGUF_ARCHES) & set(NO_ROUND_TRIP)
    assert covered == set(TINY_CONFIGS), sorted(set(TINY_CONFIGS) ^ covered)
    assert all(reason and "\n" not in reason for reason in NO_ROUND_TRIP.values())
