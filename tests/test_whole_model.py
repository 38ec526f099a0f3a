"""Every family with built-in rules: the optimized model gives the plain model's logits and greedy tokens."""

import pytest
import torch
from tiny_models import FAMILIES, tiny_model, twin

import ktinject

CPU_ONLY = {"gpu": "cpu"}


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    family = request.param
    plain = tiny_model(family)
    optimized = twin(plain)
    plan = ktinject.optimize(optimized, family, vars=CPU_ONLY)
    return family, plain, optimized, plan


# Families whose attention is transformers' standard form (kind: attention) run it in cpu_attention; where the
# whole layer is of a form cpu_decoder_layer runs (Qwen3-MoE's MoE and dense layers, GLM-4-MoE's, Qwen2-MoE's,
# Mixtral's), the layer is one cpu_decoder_layer with a cpu_attention inside.
STANDARD_ATTENTION = {"qwen3_moe", "qwen2_moe", "mixtral", "llama", "glm4_moe"}
FUSED_LAYERS = {"qwen3_moe", "glm4_moe", "qwen2_moe", "mixtral"}
WITH_DENSE_LAYERS = {"qwen3_moe", "glm4_moe"}  # tiny models with dense layers too


def test_builtin_rules_claim_experts_and_projections(pair):
    family, _, optimized, plan = pair
    ops = {entry.op for entry in plan}
    assert "keep" in ops and "linear" in ops
    # on the CPU `linear` is our kernels: every projection and the LM head; standard attention is cpu_attention
    projections = [e.module_name for e in plan if e.op == "linear"]
    attention = [e.module_name for e in plan if e.op == "attention"]
    layers = [e.module_name for e in plan if e.op == "decoder_layer"]
    assert "lm_head" in projections
    assert {type(optimized.get_submodule(n)).__name__ for n in projections} == {"CpuLinear"}
    if family in FUSED_LAYERS:
        assert layers and not attention
        for name in layers:
            layer = optimized.get_submodule(name)
            assert type(layer).__name__ == "CpuDecoderLayer" and type(layer.self_attn).__name__ == "CpuAttention"
            if layer.form.routed:
                assert type(layer.mlp.experts).__name__ == "CpuExperts"
                assert type(layer.mlp.gate).__name__ == "CpuRouter"
        routed = {optimized.get_submodule(n).form.routed for n in layers}
        assert routed == ({True, False} if family in WITH_DENSE_LAYERS else {True})
    elif family in STANDARD_ATTENTION:
        assert not layers and attention and all(n.endswith("self_attn") for n in attention)
        assert {type(optimized.get_submodule(n)).__name__ for n in attention} == {"CpuAttention"}
    else:
        assert not layers and not attention and any(n.endswith("self_attn.o_proj") for n in projections)
    if family not in ("llama", *FUSED_LAYERS):
        experts = [e for e in plan if e.op == "cpu_experts"]
        assert experts and all(e.module_name.endswith("mlp.experts") for e in experts)
        assert type(optimized.get_submodule(experts[0].module_name)).__name__ == "CpuExperts"
    assert not plan.suspicious_unmatched_rules


def test_logits_match(pair):
    _, plain, optimized, _ = pair
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = plain(ids).logits
        actual = optimized(ids).logits
    # fp32 throughout; the only difference is summation order inside the experts (gate and up as two GEMMs)
    torch.testing.assert_close(actual, expected, rtol=0, atol=2e-5)


def test_greedy_generate_matches(pair):
    _, plain, optimized, _ = pair
    ids = torch.tensor([[5, 17, 33, 2, 71]])
    kwargs = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(optimized.generate(ids, **kwargs), plain.generate(ids, **kwargs))


def test_left_padded_batch_generate_matches(pair):
    _, plain, optimized, _ = pair
    ids = torch.tensor([[0, 0, 0, 9, 41, 3], [12, 7, 88, 19, 4, 60]])
    mask = (ids != 0).long()
    mask[1] = 1
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(optimized.generate(ids, **kwargs), plain.generate(ids, **kwargs))


def test_generate_decodes_through_the_one_job_step(pair):
    """generate()'s default cache is a DynamicCache: every fused layer (and standalone cpu_attention) appends to it
    from C++ instead of the two-job path around cache.update (which would still be correct, only slower)."""
    from ktinject.operators.kv_buffer import _SLOT

    family, _, optimized, plan = pair
    ids = torch.tensor([[5, 17, 33, 2, 71]])
    out = optimized.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    native = [e.module_name for e in plan if e.op in ("decoder_layer", "attention")]
    modules = [optimized.get_submodule(n) for n in native]
    layer_ids = {getattr(m, "self_attn", m).layer_idx for m in modules}  # a fused layer's attention, or the op
    with_buffers = {i for i, layer in enumerate(out.past_key_values.layers) if _SLOT in layer.__dict__}
    assert layer_ids == with_buffers


def test_decoding_with_autograd_on_matches(pair):
    """A forward outside torch.no_grad (the embedding's output then requires grad): prefill and a decode step
    through the cache give the plain model's logits."""
    _, plain, optimized, _ = pair
    ids, nxt = torch.tensor([[5, 17, 33, 2, 71]]), torch.tensor([[7]])
    first = optimized(ids, use_cache=True)
    got = optimized(nxt, cache=first.past_key_values, use_cache=True).logits
    with torch.no_grad():
        ref = plain(ids, use_cache=True)
        want = plain(nxt, cache=ref.past_key_values, use_cache=True).logits
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=2e-5)


def test_beam_search_matches(pair):
    """Beam search reorders the cache between steps (reorder_cache): the fused layers' cache buffers follow."""
    _, plain, optimized, _ = pair
    ids = torch.tensor([[5, 17, 33, 2, 71], [8, 1, 44, 90, 13]])
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=3)
    assert torch.equal(optimized.generate(ids, **kwargs), plain.generate(ids, **kwargs))


def test_assisted_decoding_matches(pair):
    """Assisted (speculative) decoding crops rejected tokens off the cache between steps."""
    family, plain, optimized, _ = pair
    draft = tiny_model(family, seed=7)
    ids = torch.tensor([[5, 17, 33, 2, 71]])
    kwargs = dict(max_new_tokens=10, do_sample=False, assistant_model=draft)
    assert torch.equal(optimized.generate(ids, **kwargs), plain.generate(ids, **kwargs))


def test_auto_rules_pick_the_family_file():
    model = tiny_model("qwen3_moe")
    plan = ktinject.plan(model, "auto", vars=CPU_ONLY)
    assert any(str(f).endswith("qwen3_moe.yaml") for f in plan.rules.files)


def test_optimize_twice_is_refused():
    model = tiny_model("llama")
    ktinject.optimize(model, "llama", vars=CPU_ONLY)
    with pytest.raises(ktinject.KtInjectError, match="already optimized"):
        ktinject.optimize(model, "llama", vars=CPU_ONLY)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_rule_without_cuda_says_how_to_run_on_cpu():
    model = tiny_model("llama")
    with pytest.raises(
        ktinject.KtInjectError,
        match=r"places <root> on cuda:0, but CUDA is not available here; give the "
        r"built-in rules vars=\{'gpu': 'cpu'\} \(CLI: --set gpu=cpu\) or leave gpu at its default 'auto'",
    ):
        ktinject.optimize(model, "llama", vars={"gpu": "cuda:0"})
