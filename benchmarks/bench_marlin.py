#!/usr/bin/env python3
"""marlin_linear's GPU kernels against cuBLAS (bf16/fp16 ``F.linear``) and torch's int4 kernel.

    python benchmarks/bench_marlin.py                                  # H100-class shapes, M = 1 8 16 32 64
    python benchmarks/bench_marlin.py --shapes 4096x4096 --batches 1,16 --dtype float16 --json /tmp/marlin.json
    benchmarks/run_gpu.sh                                              # build the CUDA kernel, GPU tests, this

Shapes are ``KxN``: K input features, N output features (4096x14336 is Llama-3-8B's gate/up projection,
14336x4096 its down projection). Each cell is microseconds per call of ``y = x @ W.T`` with x ``[M, K]``.

Method: every method's weights are replicated until the copies are >= 3x the GPU's L2 cache and the calls
rotate over them, so each call streams its weight from HBM as in a real forward pass (an 8 MB int4 weight
would otherwise sit in the H100's 50 MB L2). Calls are captured in a CUDA graph and replayed (no Python or
launch overhead in the number; the method is marked "eager" when capture fails), timed with CUDA events,
median of 5 replays. Before timing, each int4 method's output is checked against dequantize + fp32 matmul.
The target: ours >= 3x bf16 F.linear at M <= 16.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ktinject.operators.marlin.backends import BACKENDS, PackedWeight  # noqa: E402
from ktinject.operators.marlin.format import dequantize_marlin, pack_marlin, quantize_int4  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4096x4096,4096x14336"`` -> [(4096, 4096), (4096, 14336)] as (K, N)."""
    shapes = []
    for part in text.split(","):
        k, _, n = part.lower().partition("x")
        shapes.append((int(k), int(n)))
    return shapes


def l2_bytes() -> int:
    props = torch.cuda.get_device_properties(0)
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def time_us(calls: list[Callable[[], object]], replays: int = 5) -> tuple[float, str]:
    """Median microseconds per call over ``calls`` (one per weight copy), from a CUDA graph when it captures."""
    for fn in calls:  # warm up: compile, allocate workspaces, pick cuBLAS algorithms
        fn()
    torch.cuda.synchronize()
    reps = max(1, math.ceil(64 / len(calls)))
    mode = "graph"
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for fn in calls:  # one more warm-up on the capture stream (per-stream workspaces)
                fn()
            stream.synchronize()
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(reps):
                    for fn in calls:
                        fn()
        run = graph.replay
    except Exception as exc:  # capture is best effort; eager timing still measures the kernels plus launch cost
        mode = f"eager ({type(exc).__name__})"

        def run():
            for _ in range(reps):
                for fn in calls:
                    fn()

    torch.cuda.synchronize()
    run()
    torch.cuda.synchronize()
    samples = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (reps * len(calls)))
    return statistics.median(samples), mode


def bench_shape(
    K: int, N: int, batches: list[int], dtype: torch.dtype, group_size: int, methods: list[str], device: str = "cuda"
) -> list[dict]:
    """One row per batch size: microseconds per call of each available method (checked against fp32 first)."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(N, K, generator=gen) * 0.02).to(dev)
    codes, scales = quantize_int4(w, group_size, dtype)
    qweight, mscales = pack_marlin(codes, scales, group_size)
    packed = PackedWeight(qweight, mscales, group_size, N)
    w_deq = dequantize_marlin(qweight, mscales, group_size, K, N)  # fp32, the check's reference

    def copies(nbytes: int) -> int:
        return max(2, math.ceil(3 * l2_bytes() / nbytes))

    # Per method: how many weight copies rotate, the activation dtype it takes, and (copy index, x) -> y.
    impls: dict[str, tuple[int, torch.dtype, Callable[[int, torch.Tensor], torch.Tensor]]] = {}
    for name, fdtype in (("F.linear bf16", torch.bfloat16), ("F.linear fp16", torch.float16)):
        if name in methods:
            n = copies(K * N * 2)
            ws = [w.to(fdtype) for _ in range(n)]
            impls[name] = (n, fdtype, lambda i, x, ws=ws: F.linear(x, ws[i]))
    for name, backend in (("torch int4", "torch_int4"), ("triton", "triton"), ("ours (cuda)", "cuda")):
        if name not in methods:
            continue
        reason = BACKENDS[backend].unavailable(packed)
        if reason:
            print(f"  {name}: skipped ({reason})", file=sys.stderr)
            continue
        n = copies(K * N // 2)
        kernels = [BACKENDS[backend](PackedWeight(qweight.clone(), mscales.clone(), group_size, N)) for _ in range(n)]
        impls[name] = (n, dtype, lambda i, x, ks=kernels: ks[i](x, None))

    rows = []
    for m in batches:
        x = torch.randn(m, K, generator=gen).to(device=dev, dtype=dtype)
        expected = x.float() @ w_deq.t()
        row = {"K": K, "N": N, "M": m, "dtype": str(dtype).removeprefix("torch."), "group_size": group_size}
        for name, (n, xdtype, fn) in impls.items():
            xin = x.to(xdtype)  # cast outside the timed call
            if not name.startswith("F.linear"):
                err = float((fn(0, xin).float() - expected).norm() / expected.norm())
                if err > 2e-2:
                    raise SystemExit(f"{name} is wrong for K={K} N={N} M={m}: relative error {err:.3g}")
            us, mode = time_us([lambda i=i, fn=fn, xin=xin: fn(i, xin) for i in range(n)])
            row[name] = round(us, 2)
            if mode != "graph":
                row[f"{name} mode"] = mode
        rows.append(row)
    return rows


def print_table(rows: list[dict], methods: list[str]) -> None:
    present = [m for m in methods if any(m in r for r in rows)]
    props = torch.cuda.get_device_properties(0)
    print(
        f"GPU: {props.name} ({props.multi_processor_count} SMs, L2 {l2_bytes() >> 20} MB); torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}; activations {rows[0]['dtype']}, group {rows[0]['group_size']}"
    )
    print("us per call (CUDA graph replay, weights rotated over >= 3x L2); speedup = bf16 F.linear / ours")
    print()
    header = ["K x N", "M"] + present + (["speedup"] if "ours (cuda)" in present and "F.linear bf16" in present else [])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [f"{r['K']} x {r['N']}", str(r["M"])]
        for m in present:
            v = r.get(m)
            cells.append("-" if v is None else f"{v:.1f}" + ("*" if f"{m} mode" in r else ""))
        if header[-1] == "speedup":
            ours, base = r.get("ours (cuda)"), r.get("F.linear bf16")
            cells.append(f"{base / ours:.2f}x" if ours and base else "-")
        print("| " + " | ".join(cells) + " |")
    if any(f"{m} mode" in r for r in rows for m in present):
        print("\n* timed eagerly (CUDA graph capture failed): includes launch overhead")
    if header[-1] == "speedup":
        small = [r for r in rows if r["M"] <= 16 and r.get("ours (cuda)") and r.get("F.linear bf16")]
        met = [r for r in small if r["F.linear bf16"] / r["ours (cuda)"] >= 3.0]
        print(f"\nTarget (>= 3x bf16 F.linear at M <= 16): met in {len(met)} of {len(small)} rows")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096", help="KxN,... (K inputs, N outputs)")
    parser.add_argument("--batches", default="1,8,16,32,64")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="bfloat16", help="activations and scales of the int4 kernels"
    )
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--methods", default="F.linear bf16,F.linear fp16,torch int4,triton,ours (cuda)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_marlin: needs a CUDA GPU and a CUDA build of torch (none here)", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for K, N in parse_shapes(args.shapes):
        print(f"benchmarking K={K} N={N} ...", file=sys.stderr)
        rows += bench_shape(K, N, batches, DTYPES[args.dtype], args.group_size, methods)
    print_table(rows, methods)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
