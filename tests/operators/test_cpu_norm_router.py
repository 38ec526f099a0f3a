"""cpu_rmsnorm and cpu_router against the unmodified transformers modules (every class of the recognised forms
that this transformers has), bfloat16 inputs, ties and non-finite inputs, concurrent calls, bad arguments at the
C++ boundary, and the kinds that pick them."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from ktinject.errors import OperatorError
from ktinject.native import native, native_available

if not native_available():
    pytest.fail("ktinject._native is not built", pytrace=False)

from concurrency import run_in_threads  # noqa: E402
from ktinject.operators.cpu_norm import CpuRmsNorm, unsupported_rmsnorm  # noqa: E402
from ktinject.operators.cpu_router import CpuRouter, CpuRouterConfig, router_form, router_normalizes  # noqa: E402

from ktinject.operator import OperatorConfig  # noqa: E402

CPU = torch.device("cpu")


def _cls(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)


NORMS = ["llama:LlamaRMSNorm", "qwen3_moe:Qwen3MoeRMSNorm", "mixtral:MixtralRMSNorm", "deepseek_v3:DeepseekV3RMSNorm"]


@pytest.mark.parametrize("path", NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers(path, dtype):
    torch.manual_seed(0)
    norm = _cls(path)(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    op = CpuRmsNorm.from_module(norm, name="n", device=CPU, config=OperatorConfig())
    x = (torch.randn(2, 5, 96) * 3).to(dtype)
    with torch.no_grad():
        want, got = norm.to(dtype)(x), op(x)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-6 if dtype is torch.float32 else 1e-2  # bf16: transformers rounds x/rms to bf16 before the weight
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < tol


def test_rmsnorm_handles_views_and_non_finite_rows():
    norm = _cls("llama:LlamaRMSNorm")(32)
    op = CpuRmsNorm.from_module(norm, name="n", device=CPU, config=OperatorConfig())
    x = torch.randn(4, 64)[:, ::2]  # strided
    x[1, 3] = float("nan")
    got = op(x)
    assert torch.allclose(got[[0, 2, 3]], norm(x)[[0, 2, 3]], atol=1e-6) and got[1].isnan().all()
    with pytest.raises(OperatorError, match="33 features, expected 32"):
        op(torch.randn(2, 33))


def test_rmsnorm_kind_rejects_other_forms():
    gemma = _cls("gemma:GemmaRMSNorm")(16)  # weight * (1 + w): another formula
    assert "does not compute the Llama RMSNorm" in unsupported_rmsnorm(gemma)
    assert unsupported_rmsnorm(torch.nn.LayerNorm(16)) is not None
    assert unsupported_rmsnorm(_cls("qwen3_moe:Qwen3MoeRMSNorm")(16)) is None


def test_rms_norm_binding_checks_arguments():
    N = native()
    w = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="argument 'x'"):
        N.rms_norm(np.zeros((2, 9), np.float32), w, 1e-6, np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="argument 'out'"):
        N.rms_norm(np.zeros((2, 8), np.float32), w, 1e-6, np.zeros((3, 8), np.float32))
    with pytest.raises(ValueError, match="argument 'eps'"):
        N.rms_norm(np.zeros((2, 8), np.float32), w, float("nan"), np.zeros((2, 8), np.float32))


ROUTERS = [
    ("qwen3_moe:Qwen3MoeTopKRouter", "Qwen3MoeConfig", {"norm_topk_prob": True}),
    ("qwen3_moe:Qwen3MoeTopKRouter", "Qwen3MoeConfig", {"norm_topk_prob": False}),
    ("qwen2_moe:Qwen2MoeTopKRouter", "Qwen2MoeConfig", {}),
    ("olmoe:OlmoeTopKRouter", "OlmoeConfig", {}),
    ("qwen3_5_moe:Qwen3_5MoeTopKRouter", "Qwen3_5MoeTextConfig", {}),
]


def make_router(path, config_name, extra, experts=16, top_k=4):
    config = getattr(importlib.import_module("transformers"), config_name)(
        hidden_size=64, num_experts=experts, num_experts_per_tok=top_k, **extra
    )
    torch.manual_seed(1)
    router = _cls(path)(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn_like(router.weight) * 0.3)
    return router


@pytest.mark.parametrize("path,config_name,extra", ROUTERS)
def test_router_matches_transformers(path, config_name, extra):
    router = make_router(path, config_name, extra)
    op = CpuRouter.from_module(router, name="gate", device=CPU, config=CpuRouterConfig())
    x = torch.randn(7, 64)
    with torch.no_grad():
        want, got = router(x), op(x)
    assert torch.allclose(got[0], want[0], atol=1e-5)
    assert torch.equal(got[2], want[2])
    assert torch.allclose(got[1], want[1], atol=1e-6)
    assert got[2].dtype == torch.int64 and got[1].dtype == want[1].dtype


@pytest.mark.parametrize(
    "path,config_name", [("mixtral:MixtralTopKRouter", "MixtralConfig"), ("minimax:MiniMaxTopKRouter", "MiniMaxConfig")]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixtral_router_matches_transformers(path, config_name, dtype):
    """Softmax, top-k, always renormalized; transformers leaves its weights in float32, the logits in the input's
    dtype."""
    config = getattr(importlib.import_module("transformers"), config_name)(
        hidden_size=64, num_local_experts=16, num_experts_per_tok=4
    )
    torch.manual_seed(3)
    router = _cls(path)(config).to(dtype)
    with torch.no_grad():
        router.weight.copy_(torch.randn_like(router.weight) * 0.3)
    form = router_form(router)
    assert form.score == "softmax" and form.normalize and form.float32_weights
    op = CpuRouter.from_module(router, name="gate", device=CPU, config=CpuRouterConfig())
    x = torch.randn(7, 64, dtype=dtype)
    with torch.no_grad():
        want, got = router(x), op(x)
    assert got[0].dtype == want[0].dtype == dtype and got[1].dtype == want[1].dtype == torch.float32
    if dtype is torch.float32:
        assert torch.equal(got[2], want[2])
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)
    else:  # transformers rounds the logits to bfloat16 before its softmax, we do not: compare ours to float32
        exact = router.float()(x.float())
        assert torch.equal(got[2], exact[2])


def test_router_bfloat16_and_ties():
    router = make_router(*ROUTERS[0])
    v = torch.randn(64)
    with torch.no_grad():  # experts 5 and 9 tie, ahead of every other: ours puts the lower id first, always
        router.weight[5] = v
        router.weight[9] = v
    op = CpuRouter.from_module(router, name="gate", device=CPU, config=CpuRouterConfig())
    x = 0.3 * v + 0.3 * torch.randn(5, 64)  # 5 and 9 lead; the others differ from each other (no underflow)
    logits, weights, ids = op(x.bfloat16())
    assert logits.dtype == weights.dtype == torch.bfloat16
    _, ref_weights, ref_ids = router(x)
    assert (ref_ids[:, :2].sort(-1).values == torch.tensor([5, 9])).all()  # the tie is really there
    # torch.topk leaves the order of exact ties unspecified; the chosen experts and their weights are the same
    _, w32, ids32 = op(x)
    assert torch.equal(ids32.sort(-1).values, ref_ids.sort(-1).values)
    torch.testing.assert_close(w32.sort(-1).values, ref_weights.sort(-1).values, rtol=0, atol=1e-6)
    assert (ids[:, :2] == torch.tensor([5, 9])).all() and (ids32[:, :2] == torch.tensor([5, 9])).all()


def test_router_non_finite_input_gives_non_finite_weights():
    op = CpuRouter.from_module(make_router(*ROUTERS[0]), name="gate", device=CPU, config=CpuRouterConfig())
    x = torch.randn(2, 64)
    x[1, 0] = float("inf") * 0
    _, weights, ids = op(x)
    assert weights[1].isnan().all() and not weights[0].isnan().any()
    assert ((ids >= 0) & (ids < 16)).all()


def test_router_concurrent_calls_match_sequential():
    op = CpuRouter.from_module(make_router(*ROUTERS[0]), name="gate", device=CPU, config=CpuRouterConfig())
    xs = [torch.randn(3, 64) for _ in range(6)]
    want = [op(x) for x in xs]

    def check(i):
        for _ in range(50):
            assert all(torch.equal(a, b) for a, b in zip(op(xs[i]), want[i]))

    run_in_threads(check, len(xs))


def test_router_binding_checks_arguments():
    N = native()
    gate = N.Linear(16, 64, type=0)
    with pytest.raises(ValueError, match="argument 'top_k'"):
        N.Router(gate, top_k=17, normalize=True)
    with pytest.raises(ValueError, match="argument 'gate'"):
        N.Router(object(), top_k=2, normalize=True)
    gate.load(0, np.zeros((16, 64 * 4), np.uint8))
    r = N.Router(gate, top_k=2, normalize=True)
    z = np.zeros
    with pytest.raises(ValueError, match="argument 'ids'"):
        r.route(z((3, 64), np.float32), z((3, 16), np.float32), z((3, 2), np.float32), z((3, 2), np.int32))
    with pytest.raises(ValueError, match="argument 'weights'"):
        r.route(z((3, 64), np.float32), z((3, 16), np.float32), z((3, 3), np.float32), z((3, 2), np.int64))


# The grouped sigmoid form (DeepSeek-V3): groups searched, renormalization on/off, scaling, correction bias
GROUPED = [
    ("deepseek_v3:DeepseekV3TopkRouter", "DeepseekV3Config", dict(n_group=4, topk_group=2, norm_topk_prob=True)),
    ("deepseek_v3:DeepseekV3TopkRouter", "DeepseekV3Config", dict(n_group=1, topk_group=1, norm_topk_prob=False)),
    ("glm4_moe:Glm4MoeTopkRouter", "Glm4MoeConfig", dict(n_group=2, topk_group=1, norm_topk_prob=True)),
    ("dots1:Dots1TopkRouter", "Dots1Config", dict(n_group=8, topk_group=4, norm_topk_prob=True)),
]


def make_grouped_router(path, config_name, extra, experts=16, top_k=4, scale=2.5):
    config = getattr(importlib.import_module("transformers"), config_name)(
        hidden_size=64, n_routed_experts=experts, num_experts_per_tok=top_k, routed_scaling_factor=scale, **extra
    )
    torch.manual_seed(2)
    router = _cls(path)(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn_like(router.weight) * 0.3)
        router.e_score_correction_bias.copy_(torch.randn(experts) * 0.2)  # large enough to change choices
    return router


def same_choice(got, want):
    """ids as sets per token (torch.topk(sorted=False) leaves their order open) and the weights that go with them."""
    (g_ids, g_order), (w_ids, w_order) = got[2].sort(-1), want[2].sort(-1)
    assert torch.equal(g_ids, w_ids)
    torch.testing.assert_close(got[1].gather(1, g_order), want[1].gather(1, w_order), rtol=0, atol=1e-6)


@pytest.mark.parametrize("path,config_name,extra", GROUPED)
def test_grouped_sigmoid_router_matches_transformers(path, config_name, extra):
    router = make_grouped_router(path, config_name, extra)
    form = router_form(router)
    assert form.score == "sigmoid" and form.groups == extra["n_group"] and form.scale == 2.5
    assert router_normalizes(router) is None  # not the softmax form (cpu_decoder_layer needs that one)
    op = CpuRouter.from_module(router, name="gate", device=CPU, config=CpuRouterConfig())
    x = torch.randn(9, 64)
    with torch.no_grad():
        want, got = router(x), op(x)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)
    same_choice(got, want)
    assert got[1].dtype == want[1].dtype == torch.float32 and got[2].dtype == torch.int64
    with torch.no_grad():  # bfloat16 hidden states: transformers routes them in float32, so does ours
        want, got = router(x.bfloat16()), op(x.bfloat16())
    assert got[1].dtype == torch.float32
    same_choice(got, want)


def test_grouped_router_keeps_only_the_best_groups_and_propagates_nan():
    router = make_grouped_router(*GROUPED[0])  # 4 groups of 4 experts, the best 2 kept
    with torch.no_grad():
        router.e_score_correction_bias.zero_()
        router.e_score_correction_bias[[0, 1]] = 5.0  # group 0 wins through its two best experts
        router.e_score_correction_bias[[12]] = 9.0  # one strong expert: group 3 is second (9 + its next best)
    op = CpuRouter.from_module(router, name="gate", device=CPU, config=CpuRouterConfig())
    x = torch.randn(3, 64)
    x[2, 5] = float("nan")
    _, weights, ids = op(x)
    for row in ids[:2]:
        assert {0, 1, 12} <= set(row.tolist()) and all(e < 4 or e >= 12 for e in row.tolist())
    assert weights[2].isnan().all() and not weights[:2].isnan().any()
    assert ((ids >= 0) & (ids < 16)).all()


def test_grouped_router_binding_checks_arguments():
    N = native()
    gate = N.Linear(16, 64, type=0)
    cases = [
        (dict(score="cosine"), "argument 'score'"),
        (dict(score="sigmoid", groups=3), "argument 'groups': groups must divide the 16 experts"),
        (dict(score="sigmoid", groups=16), "argument 'groups': groups are ranked by their two best"),
        (dict(score="sigmoid", groups=4, topk_groups=5), "argument 'topk_groups'"),
        (dict(score="sigmoid", groups=4, topk_groups=1, top_k=5), "argument 'top_k': top_k 5 is more than the 4"),
        (dict(score="sigmoid", bias=np.zeros(15, np.float32)), "argument 'bias'"),
        (dict(score="softmax", bias=np.zeros(16, np.float32)), "argument 'bias': only the sigmoid"),
        (dict(score="sigmoid", scale=float("inf")), "argument 'scale'"),
    ]
    for kwargs, message in cases:
        args = dict(top_k=2, normalize=True) | kwargs
        with pytest.raises(ValueError, match=message):
            N.Router(gate, **args)


def test_router_kind_rejects_other_routers():
    from transformers import GraniteMoeConfig

    granite = _cls("granitemoe:GraniteMoeTopKRouter")(GraniteMoeConfig(hidden_size=32, num_local_experts=4))
    assert router_normalizes(granite) is None  # top-k of logits, then softmax: another formula
    assert router_form(granite) is None
    with pytest.raises(OperatorError, match="not a softmax top-k router"):
        CpuRouter.from_module(granite, name="g", device=CPU, config=CpuRouterConfig())
