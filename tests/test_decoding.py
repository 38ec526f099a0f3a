"""compile_decoding: stock generate() compiles the one-token step of a CPU-placed optimized model (static KV
cache + torch.compile through the CPU operators' custom ops) and gives the plain model's greedy tokens."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, twin

import ktinject


@pytest.mark.parametrize("family", ["qwen3_moe", "llama"])
def test_compiled_decoding_generates_the_plain_models_tokens(family, caplog):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    plain = tiny_model(family)
    optimized = twin(plain)
    ktinject.optimize(optimized, family, vars={"gpu": "cpu"})
    with caplog.at_level("WARNING", logger="ktinject"):
        ktinject.compile_decoding(optimized, backend="aot_eager")  # aot_eager: traced and run, no code generated
    # Qwen3-MoE's MoE layers are whole cpu_decoder_layers, which decode faster eagerly: the user is told
    assert ("decode eagerly as one C++ job per layer" in caplog.text) == (family == "qwen3_moe")
    assert optimized.generation_config.cache_implementation == "static"
    ids = torch.tensor([[5, 17, 33, 2, 71]])
    counters.clear()
    try:
        out = optimized.generate(ids, max_new_tokens=8, do_sample=False)
    finally:
        torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] >= 1, "the decoding step was not compiled"
    assert torch.equal(out, plain.generate(ids, max_new_tokens=8, do_sample=False))


def test_a_model_without_generation_config_is_refused():
    with pytest.raises(ktinject.KtInjectError, match="no generation_config"):
        ktinject.compile_decoding(torch.nn.Linear(2, 2))
