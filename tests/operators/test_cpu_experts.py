"""The CPU MoE layer (ktinject._native.MoE) and the cpu_experts operator.

Layer level: every weight format and ISA path against the gguf-py + numpy reference (moe_reference.py),
batch sizes 1/7/128, duplicate and unsorted expert ids, threads 1/2, numa_nodes 1/2 (on a one-node machine
numa_nodes=2 splits the CPUs, which exercises the intermediate-dimension partitioning), bad input.
Operator level: built from live transformers modules, inside stock generate().
"""

from __future__ import annotations

import resource
import time

import numpy as np
import pytest

from ktinject.native import native, native_available

if not native_available():
    pytest.skip("ktinject._native is not built", allow_module_level=True)

from moe_reference import TYPES, assert_moe_close, make_layer, reference  # noqa: E402

m = native()
ISAS = m.available_isas()
E, H, I, K = 8, 256, 512, 3


def new_moe(layer, **kwargs):
    t = layer.types
    moe = m.MoE(
        layer.num_experts,
        layer.weights["gate"].shape[2],
        layer.weights["gate"].shape[1],
        gate_type=TYPES[t["gate"]],
        up_type=TYPES[t["up"]],
        down_type=TYPES[t["down"]],
        **kwargs,
    )
    moe.load(0, layer.blocks["gate"], layer.blocks["up"], layer.blocks["down"])
    return moe


def routing(tokens: int, rng: np.random.Generator, experts: int = E, k: int = K):
    x = rng.standard_normal((tokens, H)).astype(np.float32)
    ids = np.stack([rng.permutation(experts)[:k] for _ in range(tokens)]).astype(np.int64)  # unsorted, distinct
    w = rng.random((tokens, k)).astype(np.float32)
    return x, ids, w


def run(moe, x, ids, w):
    out = np.full(x.shape, np.nan, np.float32)
    moe.submit(x, ids, w, out)
    moe.sync()
    return out


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(2026)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wtype", ["q4_k", "q5_k", "q6_k", "q8_0", "bf16", "f16", "f32"])
def test_every_format_and_isa_matches_reference(wtype, isa, rng):
    layer = make_layer(E, H, I, {"gate": wtype, "up": wtype, "down": wtype}, rng)
    moe = new_moe(layer, threads=2, isa=isa)
    assert moe.isa == isa
    for tokens in (1, 7):
        x, ids, w = routing(tokens, rng)
        assert_moe_close(run(moe, x, ids, w), reference(layer, x, ids, w))


@pytest.mark.parametrize("types", [("q4_k", "q4_k", "q6_k"), ("q5_k", "q4_k", "q8_0"), ("bf16", "q8_0", "f16")])
def test_mixed_formats_per_tensor(types, rng):
    """Q4_K_M stores some down projections as Q6_K; gate, up and down may each have their own type."""
    layer = make_layer(E, H, I, dict(zip(("gate", "up", "down"), types)), rng)
    moe = new_moe(layer)
    x, ids, w = routing(9, rng)
    assert_moe_close(run(moe, x, ids, w), reference(layer, x, ids, w))


@pytest.fixture(scope="module")
def q4_layer():
    return make_layer(E, H, I, {"gate": "q4_k", "up": "q4_k", "down": "q6_k"}, np.random.default_rng(5))


@pytest.mark.parametrize("tokens", [1, 7, 128])
def test_threads_and_numa_nodes_agree(q4_layer, tokens, rng):
    x, ids, w = routing(tokens, rng)
    ref = reference(q4_layer, x, ids, w)
    one = run(new_moe(q4_layer, threads=1, numa_nodes=1), x, ids, w)
    assert_moe_close(one, ref)
    # More threads: the same tasks, results bit for bit (experts are summed in a fixed order).
    np.testing.assert_array_equal(run(new_moe(q4_layer, threads=2, numa_nodes=1), x, ids, w), one)
    split = new_moe(q4_layer, threads=2, numa_nodes=2)
    assert split.numa_nodes == 2 and split.slices == [(0, 256), (256, 512)]
    # Two nodes: each holds half of every expert's intermediate rows; only the partial sums' order differs.
    np.testing.assert_allclose(run(split, x, ids, w), one, rtol=1e-5, atol=1e-6 * np.abs(one).max())


def test_duplicate_unused_and_repeated_ids(q4_layer, rng):
    x = rng.standard_normal((4, H)).astype(np.float32)
    ids = np.array([[3, 3, 1], [E, 2, E], [7, 0, 7], [E, E, E]], np.int64)  # E marks an unused slot
    w = rng.random((4, K)).astype(np.float32)
    for moe in (new_moe(q4_layer, threads=2), new_moe(q4_layer, threads=2, numa_nodes=2)):
        out = run(moe, x, ids, w)
        assert_moe_close(out, reference(q4_layer, x, ids, w))
        assert not out[3].any()  # a token with no experts gets zeros


def test_empty_batch(q4_layer):
    moe = new_moe(q4_layer)
    out = run(moe, np.zeros((0, H), np.float32), np.zeros((0, K), np.int64), np.zeros((0, K), np.float32))
    assert out.shape == (0, H)


def test_submit_returns_before_the_result_and_sync_waits(q4_layer, rng):
    moe = new_moe(q4_layer, threads=2)
    x, ids, w = routing(128, rng)
    out = np.zeros_like(x)
    moe.submit(x, ids, w, out)
    assert moe.pending
    other = sum(i * i for i in range(20000))  # the caller's own work meanwhile (GIL released)
    moe.sync()
    assert other and not moe.pending
    assert_moe_close(out, reference(q4_layer, x, ids, w))


def test_worker_error_is_raised_at_sync_and_the_layer_recovers(q4_layer, rng):
    moe = new_moe(q4_layer, threads=2)
    x, ids, w = routing(3, rng)
    moe._fail_next_call()
    moe.submit(x, ids, w, np.zeros_like(x))
    with pytest.raises(RuntimeError, match="injected failure"):
        moe.sync()
    assert_moe_close(run(moe, x, ids, w), reference(q4_layer, x, ids, w))


def test_bad_arguments_raise_value_errors_naming_them(q4_layer, rng):
    moe = new_moe(q4_layer)
    x, ids, w = routing(2, rng)
    out = np.zeros_like(x)
    cases = [
        (lambda: moe.submit(x.astype(np.float64), ids, w, out), "'hidden_states'.*float32"),
        (lambda: moe.submit(x[:, :128].copy(), ids, w, out), "'hidden_states'.*shape"),
        (lambda: moe.submit(np.asfortranarray(np.zeros((2, H), np.float32)), ids, w, out), "C-contiguous"),
        (lambda: moe.submit(x, ids.astype(np.int32), w, out), "'top_k_index'.*int64"),
        (lambda: moe.submit(x, ids[:1], w, out), "'top_k_index'.*shape"),
        (lambda: moe.submit(x, ids, w[:, :2].copy(), out), "'top_k_weights'"),
        (lambda: moe.submit(x, ids, w, out[:1]), "'out'"),
        (lambda: moe.submit(x, np.full_like(ids, E + 1), w, out), r"top_k_index\[0, 0\] = 9 is not an expert id"),
        (lambda: moe.submit(x, np.full_like(ids, -1), w, out), "is not an expert id"),
        (
            lambda: moe.load(
                0, q4_layer.blocks["gate"][:, :, :10].copy(), q4_layer.blocks["up"], q4_layer.blocks["down"]
            ),
            "'gate'",
        ),
        (lambda: moe.load(6, q4_layer.blocks["gate"], q4_layer.blocks["up"], q4_layer.blocks["down"]), "'first'"),
        (lambda: moe.load(0, q4_layer.blocks["gate"], q4_layer.blocks["up"][:2], q4_layer.blocks["down"]), "'up'"),
        (lambda: m.MoE(E, 100, I, gate_type=12, up_type=12, down_type=12), "multiple of 256"),
        (lambda: m.MoE(E, H, I, gate_type=7, up_type=12, down_type=12), "'gate_type'"),
        (lambda: m.MoE(E, H, I, gate_type=12, up_type=12, down_type=12, activation="swish9"), "'activation'"),
        (
            lambda: m.MoE(E, H, I, gate_type=12, up_type=12, down_type=12, threads=1, numa_nodes=2),
            "fewer than numa_nodes",
        ),
        (lambda: m.MoE(E, H, I, gate_type=12, up_type=12, down_type=12, threads=999), "threads=999"),
        (lambda: m.MoE(E, H, I, gate_type=12, up_type=12, down_type=12, isa="sse9"), "'isa'"),
    ]
    for fn, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            fn()
    unloaded = m.MoE(E, H, I, gate_type=12, up_type=12, down_type=14)
    with pytest.raises(ValueError, match="not all loaded"):
        unloaded.submit(x, ids, w, out)
    assert_moe_close(run(moe, x, ids, w), reference(q4_layer, x, ids, w))  # still usable


def test_pool_is_pinned_and_sleeps_when_idle(q4_layer, rng):
    moe = new_moe(q4_layer, threads=2)
    assert moe.unpinned_cpus == [] and sum(len(c) for c in moe.cpus) == moe.threads == 2
    run(moe, *routing(4, rng))
    time.sleep(0.05)  # past the idle spin
    before = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(0.5)
    after = resource.getrusage(resource.RUSAGE_SELF)
    busy = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert busy < 0.05, f"idle workers used {busy:.2f} s of CPU in 0.5 s"


def test_weight_memory_is_the_gguf_size_once(q4_layer):
    gguf_bytes = sum(b.nbytes for b in q4_layer.blocks.values())
    assert new_moe(q4_layer).weight_bytes == gguf_bytes
    assert new_moe(q4_layer, threads=2, numa_nodes=2).weight_bytes == gguf_bytes  # split, not copied
