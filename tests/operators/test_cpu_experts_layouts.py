"""cpu_experts on every experts layout its kernels implement, against the unmodified transformers module of a
family that uses it (tiny configs from ktinject/families): transposed, interleaved, biased, not gated, and each
activation (silu, gelu_tanh, relu2, GPT-OSS's swiglu, clamp before / after silu, softcapped)."""

from __future__ import annotations

import pytest
import torch

from ktinject.native import native_available

if not native_available():
    pytest.fail("ktinject._native is not built", pytrace=False)

from ktinject.operators.cpu_experts import CpuExperts, CpuExpertsConfig  # noqa: E402
from ktinject.operators.experts_layout import experts_spec, looks_like_experts  # noqa: E402

from ktinject.families.tiny import tiny_model  # noqa: E402

# model type -> what its experts need from the kernels
LAYOUTS = {
    "qwen3_moe": "gated silu",
    "gemma4": "gated gelu_tanh",
    "aria": "transposed",
    "gpt_oss": "GPT-OSS swiglu, interleaved, transposed, bias",
    "openai_privacy_filter": "GPT-OSS swiglu, concatenated, bias",
    "deepseek_v4": "silu(clamp(gate)) * clamp(up)",
    "step3p7": "clamp(silu(gate)) * clamp(up) on some layers",
    "inkling2": "softcapped gate and up",
    "nemotron_h": "not gated, relu2",
}


@pytest.mark.parametrize("model_type", list(LAYOUTS))
def test_cpu_experts_match_the_transformers_module(model_type):
    torch.manual_seed(0)
    model = tiny_model(model_type)
    experts = [(n, m) for n, m in model.named_modules() if looks_like_experts(m)]
    assert experts
    for name, module in experts:
        spec = experts_spec(module, name=name)
        op = CpuExperts.from_module(module, name=name, device=torch.device("cpu"), config=CpuExpertsConfig())
        tokens, k = 7, 2
        x = torch.randn(tokens, spec.hidden_size) * 3  # wide enough to reach the clamps and caps
        ids = torch.stack([torch.randperm(spec.num_experts)[:k] for _ in range(tokens)])
        w = torch.rand(tokens, k)
        with torch.no_grad():
            expected = module(x, ids, w)
        got = op(x, ids, w)
        err = (got - expected).abs().max() / expected.abs().max()
        # f32 weights and activations: only summation order and the exp/tanh approximations (~2e-7) differ
        assert err < 2e-5, f"{model_type} {name} ({spec.describe()}): max relative error {err:.2e}"
