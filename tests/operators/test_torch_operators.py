"""torch_linear and torch_experts against the unmodified HF modules they replace."""

import pytest
import torch
from ktinject.operators.torch_experts import TorchExperts, TorchExpertsConfig
from ktinject.operators.torch_linear import TorchLinear, TorchLinearConfig
from tiny_models import tiny_model
from torch import nn

from ktinject import OperatorError
from ktinject.weights import ModuleSource

CPU = torch.device("cpu")
FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "glm4_moe", "gpt_oss"]


def experts_module(family):
    model = tiny_model(family)
    return next(m for n, m in model.named_modules() if n.endswith("mlp.experts"))


def routing(tokens, k, num_experts, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    return index, weights / weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_torch_experts_matches_hf_module(family, tokens):
    module = experts_module(family)
    op = TorchExperts.from_module(module, name="x.experts", device=CPU, config=TorchExpertsConfig())
    hidden = torch.randn(tokens, op.spec.hidden_size)
    index, weights = routing(tokens, 2, op.spec.num_experts)
    torch.testing.assert_close(op(hidden, index, weights), module(hidden, index, weights), rtol=0, atol=1e-5)


def test_torch_experts_duplicate_and_unsorted_ids():
    module = experts_module("qwen3_moe")
    op = TorchExperts.from_module(module, name="e", device=CPU, config=TorchExpertsConfig())
    hidden = torch.randn(3, op.spec.hidden_size)
    index = torch.tensor([[3, 3], [7, 1], [5, 0]])  # a duplicate expert in a row, descending ids
    weights = torch.rand(3, 2)
    torch.testing.assert_close(op(hidden, index, weights), module(hidden, index, weights), rtol=0, atol=1e-5)


def test_torch_experts_skips_hf_masked_slot():
    # id == num_experts marks a slot owned by another rank in HF's expert parallelism: it contributes nothing,
    # exactly like a slot with routing weight 0.
    module = experts_module("qwen3_moe")
    op = TorchExperts.from_module(module, name="e", device=CPU, config=TorchExpertsConfig())
    hidden = torch.randn(2, op.spec.hidden_size)
    weights = torch.rand(2, 2)
    masked = op(hidden, torch.tensor([[8, 0], [2, 8]]), weights)
    zeroed = weights * torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    torch.testing.assert_close(masked, module(hidden, torch.tensor([[1, 0], [2, 1]]), zeroed), rtol=0, atol=1e-5)


def test_torch_experts_bf16_storage_tracks_fp32():
    module = experts_module("mixtral")
    op = TorchExperts.from_module(module, name="e", device=CPU, config=TorchExpertsConfig(dtype="bfloat16"))
    assert op.gate.dtype == torch.bfloat16
    hidden = torch.randn(5, op.spec.hidden_size)
    index, weights = routing(5, 2, op.spec.num_experts)
    expected = module(hidden, index, weights)
    actual = op(hidden, index, weights)
    assert actual.dtype == torch.float32
    assert (actual - expected).norm() / expected.norm() < 2e-2  # bf16 weights + activations: ~3 significant digits


def test_torch_experts_from_meta_then_load_weights():
    module = experts_module("gpt_oss")
    with torch.device("meta"):
        meta_module = type(module)(module.config)
    op = TorchExperts.from_module(meta_module, name="e", device=CPU, config=TorchExpertsConfig())
    assert op.weight_names() == ["gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"]
    op.load_weights(ModuleSource(module), prefix="")
    hidden = torch.randn(4, op.spec.hidden_size)
    index, weights = routing(4, 2, op.spec.num_experts)
    torch.testing.assert_close(op(hidden, index, weights), module(hidden, index, weights), rtol=0, atol=1e-5)


def test_torch_experts_rejects_non_experts_module():
    with pytest.raises(OperatorError, match="not a fused experts module"):
        TorchExperts.from_module(nn.Linear(4, 4), name="model.layers.0.mlp", device=CPU, config=TorchExpertsConfig())


def test_torch_experts_rejects_bad_shapes():
    op = TorchExperts.from_module(experts_module("qwen3_moe"), name="e", device=CPU, config=TorchExpertsConfig())
    with pytest.raises(OperatorError, match=r"hidden_states must be \[tokens, 32\]"):
        op(torch.randn(2, 5), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2))
    with pytest.raises(OperatorError, match="top_k_index"):
        op(torch.randn(2, 32), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_torch_linear_matches_linear(bias, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(24, 40, bias=bias)
    op = TorchLinear.from_module(linear, name="q_proj", device=CPU, config=TorchLinearConfig(dtype=dtype))
    x = torch.randn(3, 5, 24)
    tol = dict(rtol=0, atol=1e-6) if dtype == "auto" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(op(x), linear(x), **tol)
    assert op(x).dtype == x.dtype


def test_torch_linear_rejects_other_modules():
    with pytest.raises(OperatorError, match="torch_linear replaces nn.Linear"):
        TorchLinear.from_module(nn.Embedding(3, 4), name="emb", device=CPU, config=TorchLinearConfig())
