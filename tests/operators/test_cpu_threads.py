"""The CPU operators under concurrency and interruption: many Python threads on one operator or on several
operators sharing the pool give bit-identical results to single-threaded calls; misuse is an OperatorError;
Ctrl-C interrupts a long call quickly and leaves the operator usable. Stress runs go through a subprocess so
that a crash or a deadlock fails the test instead of killing the run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import ktinject
from ktinject.native import native_available

if not native_available():
    pytest.fail("ktinject._native is not built", pytrace=False)

HERE = Path(__file__).resolve().parent
STRESS = HERE / "cpu_threads_stress.py"


def run_script(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    try:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(args)} did not finish in {timeout} s (deadlock?):\n{exc.stdout}\n{exc.stderr}")


@pytest.mark.parametrize("scenario", ["same-op", "many-ops", "interleaved", "linear"])
def test_threads_get_the_single_threaded_results(scenario):
    result = run_script([str(STRESS), scenario, "--threads", "4", "--calls", "16"], timeout=180)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.stdout.startswith(f"ok {scenario}")


@pytest.fixture(scope="module")
def op():
    sys.path.insert(0, str(HERE))
    from cpu_threads_stress import make_op

    return make_op(7)


def test_same_thread_double_submit_is_an_error_and_the_call_survives(op):
    from cpu_threads_stress import make_inputs

    args = make_inputs(3)
    expected = op(*args)
    op.submit(*args)
    with pytest.raises(ktinject.OperatorError, match=r"submit\(\) called twice from the same thread without sync\(\)"):
        op.submit(*args)
    assert torch.equal(op.sync(), expected)
    with pytest.raises(ktinject.OperatorError, match=r"sync\(\) without submit\(\) from this thread"):
        op.sync()


def test_another_threads_call_does_not_block_or_steal_this_one(op):
    from cpu_threads_stress import make_inputs

    mine, theirs = make_inputs(4), make_inputs(5)
    want_mine, want_theirs = op(*mine), op(*theirs)
    op.submit(*mine)  # in flight while another thread uses the same operator
    got: dict[str, torch.Tensor] = {}
    t = threading.Thread(target=lambda: got.setdefault("theirs", op(*theirs)))
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "a second thread's call waited for this thread's sync()"
    assert torch.equal(got["theirs"], want_theirs)
    assert torch.equal(op.sync(), want_mine)


def test_routing_index_must_be_integer_and_inputs_real(op):
    from cpu_threads_stress import make_inputs

    x, ids, w = make_inputs(6)
    with pytest.raises(ktinject.OperatorError, match="top_k_index must be an integer tensor, got torch.float32"):
        op(x, ids.float() + 0.5, w)
    with pytest.raises(ktinject.OperatorError, match="top_k_index must be an integer tensor, got torch.bool"):
        op(x, ids.bool(), w)
    with pytest.raises(ktinject.OperatorError, match="hidden_states is on the meta device"):
        op(x.to("meta"), ids, w)
    assert torch.equal(op(x, ids.int(), w), op(x, ids, w))  # int32 ids are fine


@pytest.mark.parametrize("weight_type", ["q4_k", "q5_k", "q6_k", "q8_0", "bf16", "f32"])
def test_non_finite_activations_propagate_per_token(weight_type):
    from cpu_threads_stress import make_inputs, make_op

    layer = make_op(11, weight_type)
    x, ids, w = make_inputs(12)
    x = torch.cat([x[:1], x[:1], x[:1]])
    ids, w = torch.cat([ids[:1]] * 3), torch.cat([w[:1]] * 3)
    x[1, 17] = float("nan")
    x[2, 3] = float("inf")
    out = layer(x, ids, w)
    assert torch.isfinite(out[0]).all()
    assert torch.isnan(out[1]).all(), "a NaN activation must make its token's output NaN"
    assert not torch.isfinite(out[2]).any(), "an infinite activation must make its token's output non-finite"


INTERRUPT_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    import torch
    from ktinject.operators.cpu_experts import CpuExperts, CpuExpertsConfig
    from transformers import AutoConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    H, I, E, K, T = 1024, 1024, 8, 2, 12288
    config = AutoConfig.for_model("qwen3_moe", hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K)
    torch.manual_seed(0)
    module = Qwen3MoeExperts(config)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    op = CpuExperts.from_module(module, name="experts", device=torch.device("cpu"), config=CpuExpertsConfig(weight_type="f32"))
    x = torch.randn(T, H)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.rand(T, K)
    small = (x[:4].clone(), ids[:4].clone(), w[:4].clone())
    expected = op(*small)
    start = time.perf_counter()
    op(x, ids, w)
    full = time.perf_counter() - start
    fired = {}
    def fire():
        time.sleep(0.2)
        fired["at"] = time.perf_counter()
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=fire).start()
    try:
        op(x, ids, w)
        print("not interrupted", full)
        sys.exit(3)
    except KeyboardInterrupt:
        latency = time.perf_counter() - fired["at"]
    assert torch.equal(op(*small), expected), "the operator gave a different result after the interrupt"
    print(f"latency {latency:.3f} full {full:.3f}")
    """
)


def test_ctrl_c_interrupts_a_long_call_and_leaves_the_operator_usable(tmp_path):
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT_SCRIPT)
    result = run_script([str(script)], timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    latency, full = (float(v) for v in result.stdout.split()[1::2])
    assert full > 0.5, f"the call took only {full:.3f} s; the test needs a longer one"
    # The waits poll signals every 50 ms and workers stop at the next sub-batch; allow for a loaded machine.
    assert latency < 0.4, f"KeyboardInterrupt came {latency:.3f} s after SIGINT"
