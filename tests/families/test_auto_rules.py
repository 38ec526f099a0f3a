"""``rules="auto"`` on every transformers model type with routed experts, without a hand-written rule.

For each family's tiny random float32 model (``ktinject.families.tiny``): ``auto`` with ``gpu=cpu`` plans on the
meta device, replaces every experts module with ``cpu_experts`` (and every projection with ``cpu_linear``), and
the optimized model's logits stay within 1e-4 of plain transformers with the same 8 greedy tokens. The families
ktinject cannot run are xfails carrying the reason ``ktinject families`` prints (``KNOWN_LIMITS``).
"""

from __future__ import annotations

import pytest

from ktinject.errors import KtInjectError
from ktinject.families.model_class import auto_model_class
from ktinject.families.status import KNOWN_LIMITS, NEW_TOKENS, TOLERANCE, static_status, verify_parity
from ktinject.families.tiny import BY_MODEL_TYPE, FAMILIES, TINY_CONFIGS
from ktinject.rules.builtin import MODEL_TYPE_RULES


def _params() -> list:
    return [
        pytest.param(f.model_type, marks=pytest.mark.xfail(reason=KNOWN_LIMITS[f.model_type], strict=True))
        if f.model_type in KNOWN_LIMITS
        else f.model_type
        for f in FAMILIES
    ]


@pytest.mark.parametrize("model_type", _params())
def test_auto_runs_the_family_like_transformers(model_type):
    status = static_status(model_type)
    assert status.ok, f"{model_type}: {status.status}: {status.reason}"
    expected_rules = f"built-in {MODEL_TYPE_RULES[model_type]}" if model_type in MODEL_TYPE_RULES else "generic MoE"
    assert status.rules == expected_rules
    parity = verify_parity(model_type)
    assert parity.experts_on_cpu == status.experts >= 1
    assert parity.max_logit_error <= TOLERANCE, f"{model_type}: max logit error {parity.max_logit_error:.2e}"
    if BY_MODEL_TYPE[model_type].generates:
        assert parity.same_tokens, f"{model_type}: the {NEW_TOKENS} greedy tokens differ from transformers'"


@pytest.mark.parametrize("model_type", sorted(KNOWN_LIMITS))
def test_known_limits_are_what_families_reports(model_type):
    status = static_status(model_type)
    assert (status.status, status.reason) == ("unsupported", KNOWN_LIMITS[model_type])


def test_at_least_90_percent_of_the_text_generators_run():
    """Of the model types transformers builds as a causal LM or as the VLM around one, >= 90% run with auto."""
    generators = []
    for model_type, build in TINY_CONFIGS.items():
        try:
            auto_model_class(build()[0])
        except KtInjectError:
            continue
        generators.append(model_type)
    running = [mt for mt in generators if mt not in KNOWN_LIMITS]
    assert len(generators) >= 70 and len(running) >= 0.9 * len(generators), sorted(set(generators) - set(running))
