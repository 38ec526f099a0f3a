"""torch and the CPU operators' pool share the cores without slowing each other down: building a CPU operator
leaves torch one intra-op thread (or $KTINJECT_TORCH_THREADS), and a torch op next to an operator call costs
no more than the two alone. Each case runs in a fresh process (torch's thread settings are process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ktinject.native import native_available

if not native_available():
    pytest.fail("ktinject._native is not built", pytrace=False)

HERE = Path(__file__).resolve().parent


def run(code: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "KTINJECT_TORCH_THREADS"}
    environment.update(PYTHONPATH=os.pathsep.join([str(HERE / "operators"), str(HERE)]), **env)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, env=environment
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_building_a_cpu_operator_leaves_torch_one_thread_and_says_why():
    out = run("""
        import logging, torch
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        torch.set_num_threads(2)
        from cpu_threads_stress import make_linear
        from ktinject import core_sharing
        make_linear(0)
        print(torch.get_num_threads())
        print(core_sharing.decision())
    """)
    threads, decision = out.splitlines()[:2]
    assert threads == "1"
    assert decision.startswith("torch intra-op threads 1 (was 2): the CPU operators' pool is pinned to CPUs")


def test_the_environment_keeps_more_torch_threads():
    out = run(
        """
        import torch
        from cpu_threads_stress import make_linear
        make_linear(0)
        print(torch.get_num_threads())
    """,
        KTINJECT_TORCH_THREADS="2",
    )
    assert out.split() == ["2"]


MEASURE = """
        import statistics, time, torch
        from cpu_threads_stress import make_inputs, make_op
        op = make_op(0, "q4_k")
        x, ids, w = make_inputs(1)
        x, ids, w = x[:1], ids[:1], w[:1]
        a = torch.randn(64, 1024, dtype=torch.bfloat16)
        b = torch.randn(1024, 1024, dtype=torch.bfloat16)

        def timed(fn, n=200):
            for _ in range(20):
                fn()
            samples = []
            for _ in range(n):
                t = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t)
            return statistics.median(samples)

        def both():
            a @ b
            op(x, ids, w)

        torch_alone, op_alone, together = timed(lambda: a @ b), timed(lambda: op(x, ids, w)), timed(both)
        print(together / (torch_alone + op_alone), torch_alone, op_alone, together)
    """


def test_a_torch_op_next_to_an_operator_call_costs_no_more_than_both_alone():
    out = run(MEASURE)
    ratio = float(out.split()[0])
    # Measured 1.0-1.1; with torch's two spinning OpenMP workers it was 3.5-9x. Timing on a shared machine: the
    # best of three runs counts.
    for _ in range(2):
        if ratio < 1.5:
            break
        ratio = min(ratio, float(run(MEASURE).split()[0]))
    assert ratio < 1.5, out
