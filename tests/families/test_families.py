"""Every transformers family with routed experts: torch_experts replaces each experts module exactly.

For each model type in ``tiny_configs`` (random float32 weights): every module ``looks_like_experts`` finds
gets an ``experts_spec`` and a ``torch_experts`` that matches the HF module on random routing (1e-5 relative),
and with all of them swapped in, the whole model's logits stay within 1e-4 of plain HF and greedy decoding
picks the same 8 tokens. A family whose experts cannot be replaced is an xfail that says why.
"""

from __future__ import annotations

import pytest
import torch
from ktinject.operators.experts_layout import looks_like_experts
from ktinject.operators.torch_experts import TorchExperts, TorchExpertsConfig

from ktinject.families.calls import experts_call
from ktinject.families.scan import model_dir_of, scan_experts_classes
from ktinject.families.tiny import BY_MODEL_TYPE, TINY_CONFIGS, tiny_model

CPU = torch.device("cpu")

# Families whose experts are not one module with the experts(hidden, index, weights) contract.
NO_EXPERTS_MODULE = {
    "jetmoe": "JetMoE routes inside JetMoeMoE and calls two JetMoeParallelExperts linears on expert-sorted rows: "
    "there is no experts module to replace (needs a block-level operator)",
}


def _params() -> list:
    marks = {mt: pytest.mark.xfail(reason=reason, strict=True) for mt, reason in NO_EXPERTS_MODULE.items()}
    return [pytest.param(mt, marks=marks[mt]) if mt in marks else mt for mt in TINY_CONFIGS]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("model_type", _params())
def test_torch_experts_replaces_every_experts_module(model_type):
    model = tiny_model(model_type)
    found = [(name, m) for name, m in model.named_modules() if looks_like_experts(m)]
    assert found, f"{model_type}: no experts module found"

    # Each experts module alone, on random routing.
    ops = {}
    for name, module in found:
        op = TorchExperts.from_module(module, name=name, device=CPU, config=TorchExpertsConfig())
        args = experts_call(op.spec)
        with torch.no_grad():
            expected, actual = module(*args), op(*args)
        assert actual.shape == expected.shape, f"{name}: {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert _relative_error(actual, expected) <= 1e-5, f"{name} ({op.spec.describe()})"
        ops[name] = op

    # All of them inside the model.
    ids = torch.arange(3, 11)[None]
    generates = BY_MODEL_TYPE[model_type].generates
    with torch.no_grad():
        torch.manual_seed(0)  # DiffusionGemma's forward draws noise
        expected_logits = model(input_ids=ids).logits
        expected_tokens = model.generate(ids, max_new_tokens=8, do_sample=False) if generates else None
    for name, op in ops.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, op)
    assert not any(looks_like_experts(m) and not isinstance(m, TorchExperts) for m in model.modules())
    with torch.no_grad():
        torch.manual_seed(0)
        logits = model(input_ids=ids).logits
        torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-4)
        if generates:
            assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), expected_tokens)


def test_every_experts_class_in_transformers_has_a_tiny_family():
    # A transformers upgrade that adds an experts family fails here until tiny_configs builds it.
    covered = {model_dir_of(mt) for mt in TINY_CONFIGS}
    classes = scan_experts_classes()
    assert {c.class_name for c in classes} >= {"Qwen3MoeExperts", "GptOssExperts", "Llama4TextExperts", "DbrxExperts"}
    missing = sorted({c.model_dir for c in classes} - covered)
    assert not missing, f"experts families without a tiny config: {missing}"


def test_scan_reads_decorator_flags():
    by_name = {c.class_name: c for c in scan_experts_classes()}
    assert (
        by_name["GptOssExperts"].decorator
        == "use_experts_implementation(is_concatenated=False, is_transposed=True, has_bias=True)"
    )
    assert by_name["Qwen3MoeExperts"].decorator == "use_experts_implementation"
    assert by_name["LongcatFlashExperts"].decorator is None
