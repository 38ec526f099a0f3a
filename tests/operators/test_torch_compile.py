"""torch.compile over a model with the CPU operators: they are custom ops (torch.ops.ktinject.*), so dynamo
captures the whole forward (fullgraph=True, no graph break) and stock generate() with a static cache and a
compile config gives the plain model's greedy tokens."""

from __future__ import annotations

import pytest
import torch

import ktinject
from ktinject.native import native_available

if not native_available():
    pytest.fail("ktinject._native is not built", pytrace=False)

from tiny_models import tiny_model, twin  # noqa: E402

# Qwen3-MoE: every layer a cpu_decoder_layer (MoE and dense); GPT-OSS: cpu_experts and cpu_linear as separate
# operators (its attention, with sinks and sliding windows, stays transformers'); Llama: cpu_attention
OPS = {
    "qwen3_moe": {"decoder_layer", "linear"},
    "gpt_oss": {"cpu_experts", "linear"},
    "llama": {"attention", "linear"},
}


@pytest.fixture(params=sorted(OPS))
def models(request):
    torch._dynamo.reset()
    plain = tiny_model(request.param)
    optimized = twin(plain)
    plan = ktinject.optimize(optimized, request.param, vars={"gpu": "cpu"})
    assert {e.op for e in plan} >= OPS[request.param]
    yield plain, optimized
    torch._dynamo.reset()


@pytest.mark.parametrize("tokens", [5, 24])  # fused layers / the parts with torch's attention (> native_tokens)
def test_the_whole_forward_compiles_as_one_graph(models, tokens):
    plain, optimized = models
    ids = torch.randint(1, 90, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    compiled = torch.compile(optimized, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break is an error
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, plain(ids).logits, rtol=0, atol=2e-5)


def test_generate_with_a_static_cache_and_compilation_matches(models):
    from torch._dynamo.utils import counters
    from transformers.generation import CompileConfig

    plain, optimized = models
    ids = torch.tensor([[5, 17, 33, 2, 71]])
    config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    counters.clear()
    out = optimized.generate(
        ids, max_new_tokens=8, do_sample=False, cache_implementation="static", compile_config=config
    )
    assert counters["stats"]["unique_graphs"] >= 1, "generate() did not compile the decoding step"
    assert torch.equal(out, plain.generate(ids, max_new_tokens=8, do_sample=False))
