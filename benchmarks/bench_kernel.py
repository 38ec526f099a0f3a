"""The gemm kernel alone, one thread: ns per tile-block and GB/s with the weights in L2 and streamed from DRAM.

A development tool for kernel changes (the operator's own numbers, side by side with its peers, come from
bench_cpu_experts.py). With the weights streaming from DRAM the kernel's speed depends as much on how many
micro-ops it spends per weight byte as on its in-cache speed, so a change is judged on the DRAM column, A/B
against the previous build in the same run (this VM's memory speed moves by 10-20% between runs):

    python benchmarks/bench_kernel.py                                   # q4_k q5_k q6_k q8_0 bf16, avx512
    python benchmarks/bench_kernel.py --quants q4_k --builds old.so new.so --rounds 3

A tile-block is 16 rows x one GGUF block of columns (256 for K-quants; 32 for Q8_0, reported per 256 columns
so every type reads the same 16 x 256 weights). L2: a 512- and a 1536-row matrix, the difference of the two
(cancels the per-call overhead). DRAM: 512 Ki rows (about 0.6-1 GiB), larger than the L3 cache, one pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

COLS = 2048


def measure(quant: str, isa: str) -> dict:
    """ns per 16 x 256 weights in L2 and from DRAM, and the DRAM stream rate (this process's extension)."""
    from bench_cpu_experts import TYPE_IDS, native, random_blocks

    m = native()
    t = TYPE_IDS[quant]
    rng = np.random.default_rng(0)

    def run(rows: int, repeats: int) -> float:
        packed = m.pack(t, random_blocks(quant, rows, COLS, rng), COLS)
        raw = m.quantize_activation(t, isa, rng.standard_normal((1, COLS), dtype=np.float32))
        buf = np.empty(raw.nbytes + 64, np.uint8)  # the kernel wants 64-byte aligned activation rows
        start = (-buf.ctypes.data) % 64
        act = buf[start : start + raw.nbytes].reshape(raw.shape)
        act[...] = raw
        out = np.empty((1, rows), np.float32)
        m.gemm_packed(t, isa, packed, rows, COLS, act, out)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            m.gemm_packed(t, isa, packed, rows, COLS, act, out)
            best = min(best, time.perf_counter() - t0)
        return best

    blocks_per_row = COLS / 256
    small, large = run(512, 3000), run(1536, 2000)
    l2_ns = (large - small) / (1024 / 16 * blocks_per_row) * 1e9
    dram_rows = 1 << 19
    dram = run(dram_rows, 3)
    dram_ns = dram / (dram_rows / 16 * blocks_per_row) * 1e9
    nbytes = dram_rows * m.row_bytes(t, COLS)
    return {"l2_ns": l2_ns, "dram_ns": dram_ns, "dram_gbs": nbytes / dram / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quants", default="q4_k,q5_k,q6_k,q8_0,bf16")
    parser.add_argument("--isa", default="avx512")
    parser.add_argument("--builds", nargs="*", default=[], help="extension .so files to compare (KTINJECT_NATIVE)")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the builds this many times; best kept")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.isa)))
        return
    builds = args.builds or [""]
    best: dict[tuple[str, str], dict] = {}
    for _ in range(args.rounds):
        for quant in args.quants.split(","):
            for build in builds:  # a fresh process per measurement: no state carried between builds
                env = dict(os.environ, **({"KTINJECT_NATIVE": build} if build else {}))
                done = subprocess.run(
                    [sys.executable, __file__, "--child", quant, "--isa", args.isa],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r = json.loads(done.stdout.strip().splitlines()[-1])
                key = (quant, build)
                if key not in best or r["dram_ns"] < best[key]["dram_ns"]:
                    best[key] = r
    print(f"command: python benchmarks/bench_kernel.py {' '.join(sys.argv[1:])}")
    print("| quant | build | L2 ns / 16x256 | DRAM ns / 16x256 | DRAM GB/s (1 thread) |")
    print("|---|---|---|---|---|")
    for (quant, build), r in best.items():
        print(
            f"| {quant} | {os.path.basename(build) or 'installed'} | {r['l2_ns']:.1f} | {r['dram_ns']:.1f} | {r['dram_gbs']:.1f} |"
        )


if __name__ == "__main__":
    main()
