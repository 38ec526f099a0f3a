"""Concurrency stress for the CPU operators, run in a subprocess by test_cpu_threads.py (a crash or a hang is
then a test failure, not a dead test run).

    python cpu_threads_stress.py SCENARIO [--threads N] [--calls M]

Scenarios (each prints "ok ..." and exits 0, or raises):
- same-op: N Python threads call ONE cpu_experts operator M times each with their own inputs.
- many-ops: N threads, each with its own operator (one per layer, as in a model), all sharing one pool.
- interleaved: each thread submits to two operators before syncing either (the async pattern), while the
  other threads do the same in other orders.
- linear: N threads call cpu_linear operators (one shared by all, one per thread) between experts calls.
Every result must be bit-identical to the same call made single-threaded beforehand: the kernels' results do
not depend on scheduling, so any difference is a race.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time

import torch
from ktinject.operators.cpu_experts import CpuExperts, CpuExpertsConfig
from ktinject.operators.experts_layout import experts_spec

H, I, E, K = 256, 256, 8, 2


def make_op(seed: int, weight_type: str = "q4_k") -> CpuExperts:
    """A cpu_experts operator over random weights (Qwen3-MoE layout), quantized by our quantizer."""
    from transformers import AutoConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = AutoConfig.for_model(
        "qwen3_moe", hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K
    )
    torch.manual_seed(seed)
    module = Qwen3MoeExperts(config)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.05)
    experts_spec(module)
    config = CpuExpertsConfig(weight_type=weight_type, threads=0)
    return CpuExperts.from_module(module, name=f"layers.{seed}.mlp.experts", device=torch.device("cpu"), config=config)


def make_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = int(torch.randint(1, 17, (1,), generator=g))
    x = torch.randn(tokens, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])
    w = torch.rand(tokens, K, generator=g)
    return x, ids, w


def run_threads(n: int, target) -> None:
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        if t.is_alive():
            raise SystemExit("a thread is still running after 120 s: deadlock")
    if errors:
        raise errors[0]


def check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if not torch.equal(got, want):
        diff = (got - want).abs().max().item()
        raise AssertionError(f"{name}: result differs from the single-threaded one (max abs diff {diff:g})")


def same_op(n: int, m: int) -> None:
    op = make_op(0)
    inputs = [[make_inputs(1000 * i + j) for j in range(m)] for i in range(n)]
    expected = [[op(*args) for args in row] for row in inputs]

    def work(i: int) -> None:
        for j, args in enumerate(inputs[i]):
            check(f"thread {i} call {j}", op(*args), expected[i][j])

    run_threads(n, work)


def many_ops(n: int, m: int) -> None:
    ops = [make_op(i) for i in range(n)]
    inputs = [[make_inputs(1000 * i + j) for j in range(m)] for i in range(n)]
    expected = [[ops[i](*args) for args in inputs[i]] for i in range(n)]

    def work(i: int) -> None:
        for j, args in enumerate(inputs[i]):
            check(f"op {i} call {j}", ops[i](*args), expected[i][j])

    run_threads(n, work)


def interleaved(n: int, m: int) -> None:
    ops = [make_op(i) for i in range(max(2, n))]
    inputs = [[make_inputs(1000 * i + j) for j in range(m)] for i in range(n)]
    expected = {(k, i, j): ops[k](*inputs[i][j]) for i in range(n) for j in range(m) for k in range(len(ops))}

    def work(i: int) -> None:
        rng = random.Random(i)
        for j, args in enumerate(inputs[i]):
            a, b = rng.sample(range(len(ops)), 2)
            ops[a].submit(*args)
            ops[b].submit(*args)
            first, second = (a, b) if rng.random() < 0.5 else (b, a)
            # Whoever syncs first must get its own result even though both calls are in flight.
            check(f"op {first} thread {i} call {j}", ops[first].sync(), expected[(first, i, j)])
            check(f"op {second} thread {i} call {j}", ops[second].sync(), expected[(second, i, j)])

    run_threads(n, work)


def make_linear(seed: int, weight_type: str = "q8_0"):
    from ktinject.operators.cpu_linear import CpuLinear, CpuLinearConfig

    torch.manual_seed(seed)
    module = torch.nn.Linear(H, 3 * H + 16, bias=True)
    return CpuLinear.from_module(
        module, name=f"layers.{seed}.proj", device=torch.device("cpu"), config=CpuLinearConfig(weight_type=weight_type)
    )


def linear(n: int, m: int) -> None:
    shared, experts = make_linear(100), make_op(0)
    own = [make_linear(i) for i in range(n)]
    inputs = [[make_inputs(1000 * i + j) for j in range(m)] for i in range(n)]
    expected = [[(shared(x), own[i](x), experts(x, ids, w)) for x, ids, w in inputs[i]] for i in range(n)]

    def work(i: int) -> None:
        for j, (x, ids, w) in enumerate(inputs[i]):
            want_shared, want_own, want_experts = expected[i][j]
            check(f"shared linear thread {i} call {j}", shared(x), want_shared)
            check(f"experts thread {i} call {j}", experts(x, ids, w), want_experts)
            check(f"own linear thread {i} call {j}", own[i](x), want_own)

    run_threads(n, work)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["same-op", "many-ops", "interleaved", "linear"])
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    scenarios = {"same-op": same_op, "many-ops": many_ops, "interleaved": interleaved, "linear": linear}
    scenarios[args.scenario](args.threads, args.calls)
    print(f"ok {args.scenario} threads={args.threads} calls={args.calls} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
