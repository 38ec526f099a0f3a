"""transformers' optional outputs through ktinject's operators: output_router_logits (and the auxiliary loss built
from them) and output_hidden_states match the plain model, whether the router is a cpu_router on its own or a part
of a whole cpu_decoder_layer (which then runs its parts so the router's logits are seen)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, twin

import ktinject


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_router_logits_and_hidden_states_are_recorded(family):
    plain = tiny_model(family)
    optimized = twin(plain)
    plan = ktinject.optimize(optimized, family, vars={"gpu": "cpu"})
    assert {"router", "decoder_layer"} & {e.op for e in plan}
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        want = plain(ids, output_router_logits=True, output_hidden_states=True)
        got = optimized(ids, output_router_logits=True, output_hidden_states=True)
    assert len(got.router_logits) == len(want.router_logits) > 0
    for a, b in zip(got.router_logits, want.router_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-5, atol=1e-6)
    assert len(got.hidden_states) == len(want.hidden_states)
    for a, b in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5 * b.abs().max().item())
    with torch.no_grad():  # and the plain decoding path afterwards is unchanged
        torch.testing.assert_close(optimized(ids).logits, plain(ids).logits, rtol=0, atol=1e-4)
