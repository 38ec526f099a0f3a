"""cpu_attention against the unmodified transformers attention module of every class it accepts: prefill (our
kernels and the torch path), decode steps through transformers' DynamicCache, padded batches (bool and float
masks), grouped and plain multi-head, bfloat16 caches, every ISA; concurrent calls from threads; bad input at
the C++ boundary; non-finite inputs."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from ktinject.errors import OperatorError
from ktinject.native import native, native_available

if not native_available():
    pytest.fail("ktinject._native is not built", pytrace=False)

from concurrency import run_in_threads  # noqa: E402
from ktinject.operators.attention_layout import SUPPORTED_CLASSES, unsupported_attention  # noqa: E402
from ktinject.operators.cpu_attention import CpuAttention, CpuAttentionConfig  # noqa: E402

CPU = torch.device("cpu")

# attention class -> (modeling module, config class, extra config kwargs)
FAMILIES = {
    "LlamaAttention": ("llama", "LlamaConfig", {}),
    "MistralAttention": ("mistral", "MistralConfig", {}),
    "MixtralAttention": ("mixtral", "MixtralConfig", {}),
    "Qwen2Attention": ("qwen2", "Qwen2Config", {}),  # q/k/v with bias
    "Qwen2MoeAttention": ("qwen2_moe", "Qwen2MoeConfig", {}),
    "Qwen3Attention": ("qwen3", "Qwen3Config", {}),
    "Qwen3MoeAttention": ("qwen3_moe", "Qwen3MoeConfig", {}),
    "Dots1Attention": ("dots1", "Dots1Config", {}),
    "MiniMaxAttention": ("minimax", "MiniMaxConfig", {}),
    "PhimoeAttention": ("phimoe", "PhimoeConfig", {}),
    "GraniteMoeAttention": ("granitemoe", "GraniteMoeConfig", {"attention_multiplier": 0.07}),
    "Glm4MoeAttention": ("glm4_moe", "Glm4MoeConfig", {"use_qk_norm": True, "attention_bias": True}),
}
ROTARY_FRACTION = {"Glm4MoeAttention": 0.5}  # partial rotary: cos/sin cover half of each head


def test_every_supported_class_is_tested():
    assert set(FAMILIES) == set(SUPPORTED_CLASSES)


def make_attention(cls_name: str, heads: int = 4, kv_heads: int = 2, head_dim: int = 32, seed: int = 0):
    module_name, config_name, extra = FAMILIES[cls_name]
    mod = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    config_cls = getattr(importlib.import_module("transformers"), config_name)
    config = config_cls(
        hidden_size=96,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=1e-5,
        attn_implementation="sdpa",
        **extra,
    )
    torch.manual_seed(seed)
    attn = getattr(mod, cls_name)(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in attn.parameters():  # norms away from 1, biases nonzero: a skipped step shows
            p.copy_(
                torch.randn_like(p) * (0.2 if p.dim() == 2 else 0.5)
                + (1.0 if p.dim() == 1 and p.numel() == head_dim else 0.0)
            )
    return attn


def rotary(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, head_dim] as transformers' rotary embeddings build them (halves repeated)."""
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = positions[..., None].float() * inv
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def causal_mask(pad: torch.Tensor, tokens: int, past: int, dtype=torch.bool) -> torch.Tensor:
    """[B, 1, T, past + T]: key s visible to query t when s <= past + t and s is not padding."""
    S = past + tokens
    allow = torch.ones(tokens, S, dtype=torch.bool).tril(past)[None] & pad[:, None, :S].bool()
    allow = allow[:, None]
    if dtype is torch.bool:
        return allow
    return torch.zeros(allow.shape, dtype=dtype).masked_fill(~allow, torch.finfo(dtype).min)


def run_steps(attn, xs, positions, masks, rot: int | None = None):
    """Run a sequence of calls through one DynamicCache; returns the outputs (rot: rotary width, else head_dim)."""
    cache = DynamicCache()
    outs = []
    for x, pos, mask in zip(xs, positions, masks):
        cos, sin = rotary(pos, rot or (attn.head_dim if hasattr(attn, "head_dim") else attn.shape.head_dim))
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        out, _ = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=mask, cache=cache)
        outs.append(out)
    return outs


def build(attn, **kwargs) -> CpuAttention:
    return CpuAttention.from_module(attn, name="layers.0.self_attn", device=CPU, config=CpuAttentionConfig(**kwargs))


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> float:
    err = ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert err < tol, err
    return err


@pytest.mark.parametrize("cls_name", sorted(FAMILIES))
def test_parity_prefill_and_decode(cls_name):
    attn = make_attention(cls_name)
    op = build(attn)
    torch.manual_seed(1)
    xs = [torch.randn(1, 5, 96), torch.randn(1, 1, 96), torch.randn(1, 1, 96), torch.randn(1, 3, 96)]
    positions = [torch.arange(5)[None], torch.tensor([[5]]), torch.tensor([[6]]), torch.arange(7, 10)[None]]
    masks = [None, None, None, causal_mask(torch.ones(1, 10), 3, 7)]
    rot = int(32 * ROTARY_FRACTION.get(cls_name, 1.0))
    with torch.no_grad():
        want = run_steps(attn, xs, positions, masks, rot)
        got = run_steps(op, xs, positions, masks, rot)
    for w, g in zip(want, got):
        assert g.shape == w.shape and g.dtype == w.dtype
        close(g, w, 2e-5)


@pytest.mark.parametrize("isa", native().available_isas())
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 32), (4, 4, 24), (8, 1, 40)])
def test_parity_shapes_and_isas(isa, heads, kv_heads, head_dim):
    attn = make_attention("Qwen3MoeAttention", heads, kv_heads, head_dim)
    op = build(attn, isa=isa)
    torch.manual_seed(2)
    xs = [torch.randn(1, 7, 96)] + [torch.randn(1, 1, 96) for _ in range(3)]
    positions = [torch.arange(7)[None]] + [torch.tensor([[7 + i]]) for i in range(3)]
    with torch.no_grad():
        for w, g in zip(run_steps(attn, xs, positions, [None] * 4), run_steps(op, xs, positions, [None] * 4)):
            close(g, w, 2e-5)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("prefill", [6, 24])  # our kernels / the torch path (native_tokens=16)
def test_padded_batch(mask_dtype, prefill):
    attn = make_attention("Qwen2MoeAttention")
    op = build(attn)
    pad = torch.ones(2, prefill + 2)
    pad[1, :3] = 0  # left padding of the second sequence
    torch.manual_seed(3)
    xs = [torch.randn(2, prefill, 96), torch.randn(2, 1, 96), torch.randn(2, 1, 96)]
    positions = [
        (pad[:, :prefill].cumsum(-1) - 1).clamp(min=0).long(),
        pad[:, : prefill + 1].sum(-1, keepdim=True).long() - 1,
        pad.sum(-1, keepdim=True).long() - 1,
    ]
    masks = [
        causal_mask(pad, prefill, 0, mask_dtype),
        causal_mask(pad, 1, prefill, mask_dtype),
        causal_mask(pad, 1, prefill + 1, mask_dtype),
    ]
    with torch.no_grad():
        want = run_steps(attn, xs, positions, masks)
        got = run_steps(op, xs, positions, masks)
    for w, g in zip(want, got):
        close(g[0], w[0], 2e-5)
        close(g[1, -1:], w[1, -1:], 2e-5)  # padded query rows are don't-care


def test_bfloat16_module():
    attn = make_attention("Qwen3MoeAttention").to(torch.bfloat16)
    ref = make_attention("Qwen3MoeAttention")  # the same weights in float32: the exact answer
    op = build(attn)
    torch.manual_seed(4)
    xs = [torch.randn(1, 6, 96), torch.randn(1, 1, 96), torch.randn(1, 1, 96)]
    positions = [torch.arange(6)[None], torch.tensor([[6]]), torch.tensor([[7]])]
    with torch.no_grad():
        exact = run_steps(ref, xs, positions, [None] * 3)
        theirs = run_steps(attn, [x.bfloat16() for x in xs], positions, [None] * 3)
        ours = run_steps(op, [x.bfloat16() for x in xs], positions, [None] * 3)
    for e, t, o in zip(exact, theirs, ours):
        assert o.dtype == torch.bfloat16
        # bf16 weights round the same way for both; we compute in float32 after that, transformers in bf16
        assert close(o, e, 0.03) <= max(2 * close(t, e, 0.05), 0.01)


def test_native_attend_matches_reference_with_long_cache():
    """Decode against a long cache held in bfloat16 with a non-contiguous (transposed) layout."""
    attn = make_attention("LlamaAttention", heads=8, kv_heads=2, head_dim=64)
    op = build(attn)
    torch.manual_seed(5)
    B, S, H, KV, hd = 2, 300, 8, 2, 64
    q = torch.randn(B, 1, H * hd)
    keys = torch.randn(B, S, KV, hd).bfloat16().transpose(1, 2)  # [B, KV, S, hd], strided
    values = torch.randn(B, S, KV, hd).bfloat16().transpose(1, 2)
    got = op.run_attend(q, keys, values, None)
    k = keys.float().repeat_interleave(H // KV, dim=1)
    v = values.float().repeat_interleave(H // KV, dim=1)
    ctx = torch.softmax(q.view(B, 1, H, hd).transpose(1, 2) @ k.transpose(-1, -2) * op.shape.scale, -1) @ v
    want = attn.o_proj(ctx.transpose(1, 2).reshape(B, 1, H * hd))
    close(got, want, 2e-5)


def test_concurrent_calls_match_sequential():
    attn = make_attention("Qwen3MoeAttention")
    op = build(attn)
    torch.manual_seed(6)
    streams = [[torch.randn(1, 4, 96)] + [torch.randn(1, 1, 96) for _ in range(12)] for _ in range(4)]
    positions = [torch.arange(4)[None]] + [torch.tensor([[4 + i]]) for i in range(12)]
    with torch.no_grad():
        want = [run_steps(op, xs, positions, [None] * 13) for xs in streams]

    def check(i):
        with torch.no_grad():
            for _ in range(5):
                assert all(
                    torch.equal(w, g) for w, g in zip(want[i], run_steps(op, streams[i], positions, [None] * 13))
                )

    run_in_threads(check, len(streams))


def test_non_finite_input_gives_non_finite_output():
    op = build(make_attention("Qwen3MoeAttention"))
    x = torch.randn(1, 1, 96)
    x[0, 0, 5] = float("nan")
    with torch.no_grad():
        out = run_steps(op, [torch.randn(1, 3, 96), x], [torch.arange(3)[None], torch.tensor([[3]])], [None, None])
    assert out[1].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_job_steps_equal_the_two_job_path(monkeypatch, dtype):
    """Decoding through DynamicCache (one job appending to buffers behind the cache layer) gives what the two
    jobs around cache.update give, for single and multi-token steps and a padded batch; the cache matches."""
    from ktinject.operators import cpu_attention

    attn = make_attention("Qwen3MoeAttention").to(dtype)
    op = build(attn)
    torch.manual_seed(4)
    pad = torch.ones(2, 12)
    pad[1, :2] = 0
    xs = [torch.randn(2, 5, 96, dtype=dtype)] + [torch.randn(2, t, 96, dtype=dtype) for t in (1, 1, 3, 1)]
    starts = [0, 5, 6, 7, 10]
    positions = [torch.arange(s, s + x.shape[1])[None].expand(2, -1) for s, x in zip(starts, xs)]
    masks = [causal_mask(pad, x.shape[1], s) for s, x in zip(starts, xs)]
    with torch.no_grad():
        one_job = run_steps(op, xs, positions, masks)
        monkeypatch.setattr(cpu_attention, "step_room", lambda *a: None)
        two_jobs = run_steps(op, xs, positions, masks)
    for a, b in zip(one_job, two_jobs):
        assert a.dtype == dtype
        close(a, b, 1e-6)


def test_step_arguments_are_checked():
    nat = build(make_attention("Qwen3MoeAttention"))._native
    f = np.zeros
    x, out, kv = f((1, 2, 96), np.float32), f((1, 2, 96), np.float32), f((1, 2, 6, 32), np.float32)
    with pytest.raises(ValueError, match="argument 'n_past'.*6 positions: no room for 2 new tokens after 5"):
        nat.step(x, None, None, kv, kv.copy(), 5, None, out)
    readonly = kv.copy()
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="argument 'keys': must be writeable"):
        nat.step(x, None, None, readonly, kv, 0, None, out)
    with pytest.raises(ValueError, match="argument 'x'"):
        nat.step(x.astype(np.float64), None, None, kv, kv.copy(), 0, None, out)
    with pytest.raises(ValueError, match="argument 'out'"):
        nat.step(x, None, None, kv, kv.copy(), 0, None, f((1, 1, 96), np.float32))
    with pytest.raises(ValueError, match="argument 'mask'"):
        nat.step(x, None, None, kv, kv.copy(), 2, f((1, 2, 5), bool), out)
    nat.step(x, None, None, kv, kv.copy(), 4, None, out)


def test_bad_arguments_raise_value_errors_naming_them():
    op = build(make_attention("Qwen3MoeAttention"))
    nat = op._native
    f = np.zeros
    with pytest.raises(ValueError, match="argument 'x'"):
        nat.project(
            f((2, 95), np.float32), None, None, f((2, 128), np.float32), f((2, 64), np.float32), f((2, 64), np.float32)
        )
    with pytest.raises(ValueError, match="argument 'cos'"):
        nat.project(
            f((2, 96), np.float32),
            f((2, 33), np.float32),
            f((2, 33), np.float32),
            f((2, 128), np.float32),
            f((2, 64), np.float32),
            f((2, 64), np.float32),
        )
    with pytest.raises(ValueError, match="argument 'k'"):
        nat.project(
            f((2, 96), np.float32), None, None, f((2, 128), np.float32), f((3, 64), np.float32), f((2, 64), np.float32)
        )
    q = f((1, 1, 128), np.float32)
    with pytest.raises(ValueError, match="argument 'keys'"):
        nat.attend(q, f((1, 2, 5, 32), np.float64), f((1, 2, 5, 32), np.float32), None, f((1, 1, 96), np.float32))
    with pytest.raises(ValueError, match="argument 'values'"):
        nat.attend(q, f((1, 2, 5, 32), np.float32), f((1, 2, 6, 32), np.float32), None, f((1, 1, 96), np.float32))
    with pytest.raises(ValueError, match="argument 'mask'"):
        nat.attend(
            q, f((1, 2, 5, 32), np.float32), f((1, 2, 5, 32), np.float32), f((1, 1, 4), bool), f((1, 1, 96), np.float32)
        )
    with pytest.raises(ValueError, match="argument 'keys'.*fewer"):
        nat.attend(
            f((1, 6, 128), np.float32),
            f((1, 2, 5, 32), np.float32),
            f((1, 2, 5, 32), np.float32),
            None,
            f((1, 6, 96), np.float32),
        )
    strided = f((1, 2, 5, 64), np.float32)[..., ::2]
    with pytest.raises(ValueError, match="contiguous"):
        nat.attend(q, strided, strided, None, f((1, 1, 96), np.float32))
    with pytest.raises(ValueError, match="argument 'q_proj'"):
        native().Attention(object(), None, None, None, hidden=96, heads=4, kv_heads=2, head_dim=32, scale=0.2)


def test_projections_must_share_a_pool_and_match_the_shape():
    N = native()
    lin = lambda rows, cols, threads=0: N.Linear(rows, cols, type=0, threads=threads)  # noqa: E731
    with pytest.raises(ValueError, match="k_proj"):
        N.Attention(
            lin(128, 96), lin(32, 96), lin(64, 96), lin(96, 128), hidden=96, heads=4, kv_heads=2, head_dim=32, scale=0.2
        )
    with pytest.raises(ValueError, match="share one thread pool"):
        N.Attention(
            lin(128, 96),
            lin(64, 96, threads=1),
            lin(64, 96),
            lin(96, 128),
            hidden=96,
            heads=4,
            kv_heads=2,
            head_dim=32,
            scale=0.2,
        )
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        N.Attention(
            lin(128, 96), lin(96, 96), lin(96, 96), lin(96, 128), hidden=96, heads=4, kv_heads=3, head_dim=32, scale=0.2
        )


def test_glm4_moe_without_qk_norm():
    attn = make_attention("Glm4MoeAttention")
    attn.use_qk_norm = False  # the config's switch: no q/k norm at all
    del attn.q_norm, attn.k_norm
    op = build(attn)
    assert not op.shape.qk_norm
    torch.manual_seed(8)
    xs, positions = [torch.randn(1, 4, 96), torch.randn(1, 1, 96)], [torch.arange(4)[None], torch.tensor([[4]])]
    with torch.no_grad():
        for w, g in zip(run_steps(attn, xs, positions, [None] * 2, 16), run_steps(op, xs, positions, [None] * 2, 16)):
            close(g, w, 2e-5)


def test_unsupported_modules_are_named():
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeAttention

    attn = OlmoeAttention(OlmoeConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2), 0)
    assert "not an attention class" in unsupported_attention(attn)
    with pytest.raises(OperatorError, match="cannot replace 'x'.*OlmoeAttention"):
        CpuAttention.from_module(attn, name="x", device=CPU, config=CpuAttentionConfig())


def test_mask_objects_other_than_tensors_are_refused():
    op = build(make_attention("Qwen3MoeAttention"))
    cos, sin = rotary(torch.arange(2)[None], 32)
    with pytest.raises(OperatorError, match="attention mask"):
        op(torch.randn(1, 2, 96), position_embeddings=(cos, sin), attention_mask=object())


def test_static_cache_with_its_padded_mask():
    """transformers' StaticCache hands back the whole preallocated cache and a mask hiding its unused tail."""
    from transformers import StaticCache

    attn = make_attention("Qwen3MoeAttention")
    op = build(attn)
    torch.manual_seed(7)
    xs = [torch.randn(1, 5, 96)] + [torch.randn(1, 1, 96) for _ in range(3)]
    positions = [torch.arange(5)[None]] + [torch.tensor([[5 + i]]) for i in range(3)]
    outs = []
    for module in (attn, op):
        cache = StaticCache(config=attn.config, max_cache_len=32)
        got = []
        with torch.no_grad():
            for x, pos in zip(xs, positions):
                T, past = x.shape[1], int(pos[0, 0])
                mask = torch.zeros(1, 1, T, 32, dtype=torch.bool)
                mask[..., : past + T] = causal_mask(torch.ones(1, past + T), T, past)
                cos, sin = rotary(pos, 32)
                out, _ = module(
                    x, position_embeddings=(cos, sin), attention_mask=mask, cache=cache, cache_position=pos[0]
                )
                got.append(out)
        outs.append(got)
    for w, g in zip(*outs):
        close(g, w, 2e-5)
