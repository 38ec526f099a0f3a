"""Sampling one token: greedy, temperature, top-k, top-p, seeds; bad values are RequestErrors naming the field."""

from __future__ import annotations

import pytest
import torch

from ktinject.serving import RequestError, SamplingParams
from ktinject.serving.sampling import model_sampling_defaults, sample

LOGITS = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])


def draws(params: SamplingParams, n: int = 400) -> set[int]:
    generator = params.make_generator()
    return {sample(LOGITS, params, generator) for _ in range(n)}


def test_greedy_is_argmax_and_draws_nothing():
    params = SamplingParams()
    assert params.greedy and params.make_generator() is None
    assert sample(LOGITS, params, None) == 1


def test_top_k_and_top_p_limit_the_candidates():
    assert draws(SamplingParams(temperature=1.0, top_k=2, seed=0)) == {1, 2}
    assert draws(SamplingParams(temperature=1.0, top_k=1, seed=0)) == {1}
    # p(1) ~ 0.47, p(2) ~ 0.43: top_p 0.4 keeps token 1 only, 0.8 keeps both, 1.0 keeps all
    assert draws(SamplingParams(temperature=1.0, top_p=0.4, seed=0)) == {1}
    assert draws(SamplingParams(temperature=1.0, top_p=0.8, seed=0)) == {1, 2}
    assert draws(SamplingParams(temperature=1.0, seed=0), n=2000) == {0, 1, 2, 3, 4}


def test_a_seed_gives_the_same_draws():
    params = SamplingParams(temperature=0.8, seed=1234)
    a, b = params.make_generator(), params.make_generator()
    assert [sample(LOGITS, params, a) for _ in range(50)] == [sample(LOGITS, params, b) for _ in range(50)]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_tokens", 0, "max_tokens must be at least 1, got 0"),
        ("temperature", -0.5, r"temperature must be in \[0, 100\], got -0.5"),
        ("top_p", 0.0, r"top_p must be in \(0, 1\], got 0.0"),
        ("top_k", -2, "top_k must be 0 \\(off\\) or positive, got -2"),
        ("stop", ("",), "stop strings must not be empty"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(RequestError, match=message) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field


def test_model_defaults_only_when_the_model_samples():
    from transformers import GenerationConfig

    assert model_sampling_defaults(GenerationConfig(temperature=0.6)) == {}
    assert model_sampling_defaults(GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95, top_k=20)) == {
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
    }
