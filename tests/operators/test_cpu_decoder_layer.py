"""cpu_decoder_layer against the unmodified transformers decoder layer (Qwen3-MoE): prefill (parts) and decode
steps through DynamicCache (one job that appends to the cache's buffers) and StaticCache (two jobs around
cache.update), padded batches, bfloat16; the fused paths equal to the parts path; the cache buffers through
growth, crop, reorder and reset; concurrent calls; bad arguments at the C++ boundary; what it refuses and why."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache, Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer

from ktinject.errors import OperatorError
from ktinject.native import native, native_available

if not native_available():
    pytest.fail("ktinject._native is not built", pytrace=False)

from concurrency import run_in_threads  # noqa: E402
from ktinject.operators.cpu_decoder_layer import (  # noqa: E402
    CpuDecoderLayer,
    CpuDecoderLayerConfig,
    LayerForm,
    unsupported_decoder_layer,
)

CPU = torch.device("cpu")
HIDDEN, HEAD_DIM = 64, 16


def randomized(layer_class, config, layer_idx: int = 0, seed: int = 0):
    """A layer in eval mode with random weights: matrices ~0.2 N(0, 1), vectors (norms, biases) ~1 + 0.3 N(0, 1)."""
    torch.manual_seed(seed)
    layer = layer_class(config, layer_idx=layer_idx).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() >= 2 else 0.3) + (1.0 if p.dim() == 1 else 0.0))
    return layer


def make_layer(seed: int = 0, norm_topk_prob: bool = True) -> Qwen3MoeDecoderLayer:
    config = Qwen3MoeConfig(
        hidden_size=HIDDEN,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        num_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=32,
        norm_topk_prob=norm_topk_prob,
        rms_norm_eps=1e-5,
        attn_implementation="sdpa",
    )
    return randomized(Qwen3MoeDecoderLayer, config, 0, seed)


def build(layer, **kwargs) -> CpuDecoderLayer:
    return CpuDecoderLayer.from_module(layer, name="model.layers.0", device=CPU, config=CpuDecoderLayerConfig(**kwargs))


def rotary(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    angles = positions[..., None].float() * inv
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def causal_mask(pad: torch.Tensor, tokens: int, past: int) -> torch.Tensor:
    allow = torch.ones(tokens, past + tokens, dtype=torch.bool).tril(past)[None] & pad[:, None, : past + tokens].bool()
    return allow[:, None]


def run_steps(layer, xs, positions, masks, cache=None):
    cache = cache if cache is not None else DynamicCache()
    outs = []
    with torch.no_grad():
        for x, pos, mask in zip(xs, positions, masks):
            cos, sin = rotary(pos)
            outs.append(
                layer(x, attention_mask=mask, cache=cache, position_embeddings=(cos.to(x.dtype), sin.to(x.dtype)))
            )
    return outs


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> float:
    err = ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert err < tol, err
    return err


def steps(batch: int = 1, prefill: int = 6, decode: int = 4, seed: int = 1):
    torch.manual_seed(seed)
    xs = [torch.randn(batch, prefill, HIDDEN)] + [torch.randn(batch, 1, HIDDEN) for _ in range(decode)]
    positions = [torch.arange(prefill)[None].expand(batch, -1)] + [
        torch.full((batch, 1), prefill + i) for i in range(decode)
    ]
    return xs, positions


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_matches_transformers_prefill_and_decode(norm_topk_prob):
    layer = make_layer(norm_topk_prob=norm_topk_prob)
    op = build(layer)
    xs, positions = steps()
    for want, got in zip(run_steps(layer, xs, positions, [None] * 5), run_steps(op, xs, positions, [None] * 5)):
        assert got.shape == want.shape and got.dtype == want.dtype
        close(got, want, 2e-5)


def test_fused_path_equals_the_parts_path():
    layer = make_layer()
    fused, parts = build(layer, native_tokens=64), build(layer, native_tokens=0)
    xs, positions = steps(prefill=5, decode=3)
    for a, b in zip(run_steps(fused, xs, positions, [None] * 4), run_steps(parts, xs, positions, [None] * 4)):
        close(a, b, 1e-6)


def test_padded_batch_with_a_mask():
    layer = make_layer()
    op = build(layer)
    pad = torch.ones(2, 9)
    pad[1, :2] = 0
    xs, positions = steps(batch=2, prefill=6, decode=3)
    masks = [causal_mask(pad, 6, 0)] + [causal_mask(pad, 1, 6 + i) for i in range(3)]
    for want, got in zip(run_steps(layer, xs, positions, masks), run_steps(op, xs, positions, masks)):
        close(got[0], want[0], 2e-5)
        close(got[1, -1:], want[1, -1:], 2e-5)


def test_decode_steps_append_to_buffers_behind_the_cache(monkeypatch):
    """After prefill, DynamicCache's keys/values are views of buffers the C++ step writes into; the buffers grow
    (here from one spare position), and the outputs and cache contents stay the parts path's."""
    from ktinject.operators import kv_buffer

    monkeypatch.setattr(kv_buffer, "MIN_SPARE", 1)
    made = []
    make = kv_buffer._make_buffers
    monkeypatch.setattr(kv_buffer, "_make_buffers", lambda *a: made.append(a[2]) or make(*a))
    layer = make_layer()
    fused, parts = build(layer, native_tokens=64), build(layer, native_tokens=0)
    xs, positions = steps(prefill=3, decode=12)
    cache_f, cache_p = DynamicCache(), DynamicCache()
    for a, b in zip(
        run_steps(fused, xs, positions, [None] * 13, cache_f), run_steps(parts, xs, positions, [None] * 13, cache_p)
    ):
        close(a, b, 1e-6)
    assert len(made) > 2  # grown more than once
    keys = cache_f.layers[0].keys
    buffers = cache_f.layers[0].__dict__[kv_buffer._SLOT]
    assert keys.data_ptr() == buffers.keys.data_ptr() and keys.shape[2] == 15 and cache_f.get_seq_length() == 15
    close(keys, cache_p.layers[0].keys, 1e-6)
    close(cache_f.layers[0].values, cache_p.layers[0].values, 1e-6)


@pytest.mark.parametrize("change", ["crop", "reorder", "reset", "update"])
def test_cache_changes_between_steps_are_followed(change):
    """What transformers (or another op) does to the cache layer between steps: crop (assisted decoding),
    reorder (beam search), reset (a new prompt), an ordinary update: the next step sees it, as the parts do."""
    layer = make_layer()
    fused, parts = build(layer, native_tokens=64), build(layer, native_tokens=0)
    xs, positions = steps(batch=2, prefill=4, decode=6)
    outs = []
    for op in (fused, parts):
        cache = DynamicCache()
        got = run_steps(op, xs[:4], positions[:4], [None] * 4, cache)
        if change == "crop":
            cache.crop(-2)
            tail = [(x, p - 2) for x, p in zip(xs[4:], positions[4:])]
        elif change == "reorder":
            cache.reorder_cache(torch.tensor([1, 1]))
            tail = list(zip(xs[4:], positions[4:]))
        elif change == "reset":
            cache = DynamicCache()
            tail = [(xs[0], positions[0])] + list(zip(xs[4:], [p - 3 for p in positions[4:]]))
        else:
            k = torch.randn(2, 2, 1, HEAD_DIM, generator=torch.Generator().manual_seed(3))
            cache.update(k, k.clone(), 0)
            tail = [(x, p + 1) for x, p in zip(xs[4:], positions[4:])]
        got += run_steps(op, [x for x, _ in tail], [p for _, p in tail], [None] * len(tail), cache)
        outs.append(got)
    for a, b in zip(*outs):
        close(a, b, 1e-6)


def test_a_deep_copied_cache_decodes_on_its_own():
    """transformers suggests copy.deepcopy to reuse a prompt's cache: the copy and the original then decode
    different tokens, each as the parts path does, neither writing into the other."""
    import copy

    layer = make_layer()
    fused, parts = build(layer), build(layer, native_tokens=0)
    xs, positions = steps(prefill=4, decode=6, seed=5)
    outs, caches = [], []
    for op in (fused, parts):
        prompt = DynamicCache()
        got = run_steps(op, xs[:3], positions[:3], [None] * 3, prompt)  # prefill + 2 steps: buffers in place
        branch = copy.deepcopy(prompt)
        got += run_steps(op, xs[3:5], positions[3:5], [None] * 2, branch)
        got += run_steps(op, xs[5:7], positions[3:5], [None] * 2, prompt)  # other tokens at the same positions
        got += run_steps(op, xs[3:4], positions[5:6], [None], branch)
        outs.append(got)
        caches.append([(c.layers[0].keys, c.layers[0].values) for c in (prompt, branch)])
    for a, b in zip(*outs):
        close(a, b, 1e-6)
    for (k1, v1), (k2, v2) in zip(*caches):  # what transformers (or a later prefill) reads from the cache
        assert k1.shape == k2.shape
        close(k1, k2, 1e-6)
        close(v1, v2, 1e-6)


def make_glm_layer(layer_idx: int, seed: int = 0):
    """GLM-4-MoE: layer 0 a dense SiLU MLP, layer 1 a DeepSeek-V3-form MoE block (grouped sigmoid router with a
    correction bias and scaling, routed experts, a shared expert)."""
    from transformers import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeDecoderLayer

    config = Glm4MoeConfig(
        hidden_size=HIDDEN,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        partial_rotary_factor=1.0,
        intermediate_size=48,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=1.7,
        first_k_dense_replace=1,
        rms_norm_eps=1e-5,
        attn_implementation="sdpa",
    )
    layer = randomized(Glm4MoeDecoderLayer, config, layer_idx, seed)
    if layer_idx > 0:
        layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.1)
    return layer


def make_qwen2_layer(seed: int = 0):
    """Qwen2-MoE: q/k/v biases, a softmax router, routed experts and a shared expert scaled by a sigmoid gate."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeDecoderLayer

    config = Qwen2MoeConfig(
        hidden_size=HIDDEN,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        rms_norm_eps=1e-5,
        attn_implementation="sdpa",
    )
    return randomized(Qwen2MoeDecoderLayer, config, 0, seed)


def make_mixtral_layer(seed: int = 0):
    """Mixtral: its own layer and block sources (the same computation), a router that keeps float32 weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer

    config = MixtralConfig(
        hidden_size=HIDDEN,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        intermediate_size=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        rms_norm_eps=1e-5,
        attn_implementation="sdpa",
    )
    return randomized(MixtralDecoderLayer, config, 0, seed)


LAYERS = {
    "mixtral": (make_mixtral_layer, LayerForm(True, None)),
    "glm4-dense-mlp": (lambda: make_glm_layer(0), LayerForm(False, "mlp.")),
    "glm4-moe-with-shared-experts": (lambda: make_glm_layer(1), LayerForm(True, "mlp.shared_experts.")),
    "qwen2-moe-with-gated-shared-expert": (make_qwen2_layer, LayerForm(True, "mlp.shared_expert.", shared_gate=True)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_more_layer_forms_match_transformers(name, dtype):
    """Dense MLP layers and MoE layers with shared experts through every path: the parts one by one
    (native_tokens=0), the two jobs (a 5-token prompt into an empty cache) and the one-job decode steps."""
    make, form = LAYERS[name]
    exact = make()
    layer = make().to(dtype)
    op, parts = build(layer), build(layer, native_tokens=0)
    assert op.form == form
    xs, positions = steps(prefill=5, decode=4)
    want = run_steps(exact, xs, positions, [None] * 5)
    theirs = run_steps(layer, [x.to(dtype) for x in xs], positions, [None] * 5)
    ours = run_steps(op, [x.to(dtype) for x in xs], positions, [None] * 5)
    fused = run_steps(parts, [x.to(dtype) for x in xs], positions, [None] * 5)
    for w, t, o, f in zip(want, theirs, ours, fused):
        assert o.dtype == dtype
        if dtype is torch.float32:
            close(o, w, 2e-5)
            close(f, w, 2e-5)
        else:  # within twice transformers' own bfloat16 error
            assert close(o, w, 0.05) <= max(2 * close(t, w, 0.1), 0.01)
            assert close(f, w, 0.05) <= max(2 * close(t, w, 0.1), 0.01)


def test_layer_parts_are_checked_at_the_boundary():
    op = build(make_glm_layer(1))
    shared = op.mlp.shared_experts
    g, u, d = shared.gate_proj._linear, shared.up_proj._linear, shared.down_proj._linear
    with pytest.raises(ValueError, match="needs all three of gate, up and down"):
        native_layer(op, mlp_gate=g)
    with pytest.raises(ValueError, match="router and experts come together"):
        native_layer(op, experts=None)
    with pytest.raises(ValueError, match="needs routed experts, an MLP or both"):
        native_layer(op, router=None, experts=None)
    with pytest.raises(ValueError, match="hidden 64 -> inter -> hidden"):
        native_layer(op, mlp_gate=d, mlp_up=u, mlp_down=g)
    with pytest.raises(ValueError, match="argument 'mlp_up'"):
        native_layer(op, mlp_gate=g, mlp_up=object(), mlp_down=d)
    native_layer(op, mlp_gate=g, mlp_up=u, mlp_down=d)  # the shared experts' layer as built
    with pytest.raises(ValueError, match="shared_gate must be \\[1, hidden 64\\]"):
        native_layer(op, mlp_gate=g, mlp_up=u, mlp_down=d, mlp_shared_gate=g)
    qwen2 = build(make_qwen2_layer())
    with pytest.raises(ValueError, match="shared_gate scales the MLP"):
        native_layer(qwen2, mlp_shared_gate=qwen2.mlp.shared_expert_gate._linear)


def test_static_cache():
    from transformers import StaticCache

    layer = make_layer()
    op = build(layer)
    xs, positions = steps(prefill=5, decode=3)
    outs = []
    for module in (layer, op):
        cache = StaticCache(config=layer.self_attn.config, max_cache_len=16)
        got = []
        with torch.no_grad():
            for x, pos in zip(xs, positions):
                T, past = x.shape[1], int(pos[0, 0])
                mask = torch.zeros(1, 1, T, 16, dtype=torch.bool)
                mask[..., : past + T] = causal_mask(torch.ones(1, past + T), T, past)
                cos, sin = rotary(pos)
                got.append(
                    module(x, attention_mask=mask, cache=cache, position_embeddings=(cos, sin), cache_position=pos[0])
                )
        outs.append(got)
    for want, got in zip(*outs):
        close(got, want, 2e-5)


def test_bfloat16_stream_is_converted_inside_the_jobs():
    """A bfloat16 layer hands bfloat16 keys/values to the cache and returns bfloat16, like the parts path."""
    layer = make_layer().to(torch.bfloat16)
    fused, parts = build(layer, native_tokens=64), build(layer, native_tokens=0)
    xs, positions = steps(prefill=4, decode=2)
    xs = [x.bfloat16() for x in xs]
    cache = DynamicCache()
    got = run_steps(fused, xs, positions, [None] * 3, cache)
    assert all(o.dtype == torch.bfloat16 for o in got) and cache.layers[0].keys.dtype == torch.bfloat16
    for a, b in zip(got, run_steps(parts, xs, positions, [None] * 3)):
        close(a, b, 1e-2)  # the parts round the stream to bf16 between them; the fused jobs keep float32 inside


def test_bfloat16_layer_tracks_float32():
    exact, layer = make_layer(), make_layer().to(torch.bfloat16)
    op = build(layer)
    xs, positions = steps()
    want = run_steps(exact, xs, positions, [None] * 5)
    theirs = run_steps(layer, [x.bfloat16() for x in xs], positions, [None] * 5)
    ours = run_steps(op, [x.bfloat16() for x in xs], positions, [None] * 5)
    for w, t, o in zip(want, theirs, ours):
        assert o.dtype == torch.bfloat16
        assert close(o, w, 0.05) <= max(2 * close(t, w, 0.1), 0.01)


def test_concurrent_calls_match_sequential():
    op = build(make_layer())
    runs = [steps(seed=s, decode=10) for s in range(4)]
    want = [run_steps(op, xs, pos, [None] * 11) for xs, pos in runs]

    def check(i):
        for _ in range(4):
            assert all(torch.equal(a, b) for a, b in zip(run_steps(op, *runs[i], [None] * 11), want[i]))

    run_in_threads(check, len(runs))


def test_non_finite_input_gives_non_finite_output():
    op = build(make_layer())
    xs, positions = steps(decode=1)
    xs[1][0, 0, 3] = float("nan")
    assert run_steps(op, xs, positions, [None, None])[1].isnan().any()


def native_layer(op: CpuDecoderLayer, **overrides):
    """A _native.DecoderLayer from ``op``'s parts, with some arguments replaced."""
    args = dict(
        attention=op.self_attn._native,
        router=op.mlp.gate._router,
        experts=op.mlp.experts._moe,
        input_norm=np.ones(HIDDEN, np.float32),
        input_eps=1e-6,
        post_norm=np.ones(HIDDEN, np.float32),
        post_eps=1e-6,
    )
    args.update(overrides)
    return native().DecoderLayer(**args)


def test_bad_arguments_raise_value_errors_naming_them():
    op = build(make_layer())
    nat = op._native
    z = np.zeros
    with pytest.raises(ValueError, match="argument 'x'"):
        nat.pre(
            z((1, HIDDEN + 1), np.float32),
            None,
            None,
            z((1, 64), np.float32),
            z((1, 32), np.float32),
            z((1, 32), np.float32),
        )
    with pytest.raises(ValueError, match="argument 'x': expected dtype float32 or int16"):
        nat.pre(
            z((1, HIDDEN), np.float64),
            None,
            None,
            z((1, 64), np.float32),
            z((1, 32), np.float32),
            z((1, 32), np.float32),
        )
    with pytest.raises(ValueError, match="argument 'k'"):
        nat.pre(
            z((1, HIDDEN), np.int16), None, None, z((1, 64), np.float32), z((1, 31), np.int16), z((1, 32), np.int16)
        )
    q = z((1, 1, 64), np.float32)
    kv = z((1, 2, 3, HEAD_DIM), np.float32)
    with pytest.raises(ValueError, match="argument 'x'"):
        nat.post(q, kv, kv, None, z((1, 2, HIDDEN), np.float32), z((1, 1, HIDDEN), np.float32))
    with pytest.raises(ValueError, match="argument 'out'"):
        nat.post(q, kv, kv, None, z((1, 1, HIDDEN), np.float32), z((1, 1, HIDDEN), np.float64))
    with pytest.raises(ValueError, match="argument 'router'"):
        native_layer(op, router=object())
    with pytest.raises(ValueError, match="argument 'post_norm'"):
        native_layer(op, post_norm=z(3, np.float32))
    with pytest.raises(ValueError, match="eps"):
        native_layer(op, input_eps=float("nan"))


def test_step_arguments_are_checked():
    nat = build(make_layer())._native
    z = np.zeros
    x, out = z((1, 1, HIDDEN), np.float32), z((1, 1, HIDDEN), np.float32)
    kv = z((1, 2, 4, HEAD_DIM), np.float32)
    with pytest.raises(ValueError, match="argument 'n_past'.*4 positions: no room for 1 new tokens after 4"):
        nat.step(x, None, None, kv, kv.copy(), 4, None, out)
    with pytest.raises(ValueError, match="argument 'n_past'"):
        nat.step(x, None, None, kv, kv.copy(), -1, None, out)
    readonly = kv.copy()
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="argument 'values': must be writeable"):
        nat.step(x, None, None, kv, readonly, 0, None, out)
    with pytest.raises(ValueError, match="argument 'keys'"):
        nat.step(x, None, None, z((1, 3, 4, HEAD_DIM), np.float32), kv, 0, None, out)
    with pytest.raises(ValueError, match="argument 'values'"):
        nat.step(x, None, None, kv, z((1, 2, 5, HEAD_DIM), np.float32), 0, None, out)
    with pytest.raises(ValueError, match="argument 'keys'"):
        nat.step(x, None, None, kv.astype(np.float64), kv, 0, None, out)
    with pytest.raises(ValueError, match="argument 'mask'"):
        nat.step(x, None, None, kv, kv.copy(), 1, np.ones((1, 1, 3), bool), out)
    with pytest.raises(ValueError, match="argument 'out'"):
        nat.step(x, None, None, kv, kv.copy(), 0, None, z((1, 2, HIDDEN), np.float32))
    nat.step(x, None, None, kv, kv.copy(), 3, None, out)  # the last free position: fine


def test_parts_on_another_pool_are_refused():
    layer = make_layer()
    a, b = build(layer, threads=1), build(layer)
    if a.self_attn._native.threads == b.mlp.experts._moe.threads:
        pytest.skip("one CPU: every pool is the same")
    with pytest.raises(ValueError, match="share one thread pool"):
        native_layer(b, attention=a.self_attn._native)


def test_unsupported_layers_are_named():
    from transformers import GraniteMoeConfig
    from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeDecoderLayer

    granite = GraniteMoeDecoderLayer(
        GraniteMoeConfig(
            hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32, num_local_experts=4
        ),
        0,
    )
    assert "not a decoder layer of the Llama form" in unsupported_decoder_layer(granite)  # residual multipliers
    gelu = Qwen3MoeDecoderLayer(
        Qwen3MoeConfig(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            mlp_only_layers=[0],
            hidden_act="gelu",
        ),
        0,
    )
    assert "its mlp: its activation is GELUActivation, not SiLU" in unsupported_decoder_layer(gelu)
    with pytest.raises(OperatorError, match="cannot replace 'x'"):
        CpuDecoderLayer.from_module(gelu, name="x", device=CPU, config=CpuDecoderLayerConfig())
