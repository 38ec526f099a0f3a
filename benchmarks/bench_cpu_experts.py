#!/usr/bin/env python3
"""cpu_experts against its peers on one Qwen3-30B-A3B-shaped MoE layer (hidden 2048, expert intermediate
768, 128 experts, top-8), side by side in one run, reported as ratios.

    python benchmarks/bench_cpu_experts.py                      # Q4_K, Q8_0, BF16; 1 and 2 threads; peers
    python benchmarks/bench_cpu_experts.py --quants q4_k --threads 2 --no-peers

Method: every call routes its tokens to top-8 of all 128 experts at random, and calls cycle through
enough layers' weights (>= 3x the L3 cache) that the weights come from DRAM, as in a real model. Times
are the median of repeated calls (ms per layer). Decode = 1 token, prefill = 128 tokens. The roofline is
the bytes of the 8 active experts over this machine's read bandwidth, measured in the same run with the
same pinned threads. Peers: transformers' own experts module in bf16 (torch), llama.cpp (llama-bench on a
GGUF of the same quant: (4-layer - 1-layer) / 3), ik_llama.cpp (the same, with and without its run-time repack)
and kt-kernel, when installed (benchmarks/peers.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ktinject.native import native  # noqa: E402

HIDDEN, INTER, EXPERTS, TOP_K = 2048, 768, 128, 8
TYPE_IDS = {"q4_k": 12, "q5_k": 13, "q6_k": 14, "q8_0": 8, "bf16": 30, "f16": 1, "f32": 0}
# Byte offsets of the fp16 scale fields in each block (random blocks need finite, small scales there).
SCALE_FIELDS = {"q8_0": (34, [0]), "q4_k": (144, [0, 2]), "q5_k": (176, [0, 2]), "q6_k": (210, [208])}


def l3_bytes() -> int:
    try:
        import subprocess

        out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("L3"):
                return int(line.split()[2])
    except Exception:
        pass
    return 256 << 20


def random_blocks(quant: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid GGUF rows of random codes (quantizing 600M floats per layer would take minutes)."""
    m = native()
    if quant in ("bf16", "f16", "f32"):
        x = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
        if quant == "f32":
            return x.view(np.uint8)
        if quant == "f16":
            return x.astype(np.float16).view(np.uint8)
        return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    rb = m.row_bytes(TYPE_IDS[quant], cols)
    raw = rng.integers(0, 256, size=(rows, rb), dtype=np.uint8)
    block, fields = SCALE_FIELDS[quant]
    view = raw.reshape(rows, -1, block)
    scale = np.full(view.shape[:2], 1e-3, np.float16).view(np.uint8).reshape(*view.shape[:2], 2)
    for off in fields:
        view[:, :, off : off + 2] = scale
    return raw


def expert_bytes(quant: str) -> int:
    m = native()
    t = TYPE_IDS[quant]
    return 2 * INTER * m.row_bytes(t, HIDDEN) + HIDDEN * m.row_bytes(t, INTER)


def layers_for_dram(bytes_per_layer: int) -> int:
    return max(2, -(-3 * l3_bytes() // bytes_per_layer))


def routings(tokens: int, count: int, rng: np.random.Generator):
    out = []
    for _ in range(count):
        ids = np.stack([rng.choice(EXPERTS, TOP_K, replace=False) for _ in range(tokens)]).astype(np.int64)
        w = rng.random((tokens, TOP_K), dtype=np.float32)
        x = rng.standard_normal((tokens, HIDDEN), dtype=np.float32)
        out.append((x, ids, w))
    return out


def median_ms(fn, n_layers: int, calls: int, min_seconds: float) -> float:
    for i in range(n_layers):  # warm-up: every layer once
        fn(i)
    times = []
    start = time.perf_counter()
    i = 0
    while i < calls or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
        i += 1
    return 1e3 * statistics.median(times)


@dataclass
class Row:
    impl: str
    quant: str
    threads: int
    decode_ms: float | None
    prefill_ms: float | None
    note: str = ""


def bench_ours(quant: str, threads_list: list[int], args) -> list[Row]:
    m = native()
    rng = np.random.default_rng(0)
    t = TYPE_IDS[quant]
    n_layers = args.layers or layers_for_dram(EXPERTS * expert_bytes(quant))
    print(
        f"  building {n_layers} layers of {quant} experts ({n_layers * EXPERTS * expert_bytes(quant) / 2**30:.2f} GiB)...",
        flush=True,
    )
    blocks = []
    for _ in range(n_layers):
        gate = random_blocks(quant, EXPERTS * INTER, HIDDEN, rng).reshape(EXPERTS, INTER, -1)
        up = random_blocks(quant, EXPERTS * INTER, HIDDEN, rng).reshape(EXPERTS, INTER, -1)
        down = random_blocks(quant, EXPERTS * HIDDEN, INTER, rng).reshape(EXPERTS, HIDDEN, -1)
        blocks.append((gate, up, down))
    rows = []
    for threads in threads_list:
        layers = []
        for gate, up, down in blocks:
            moe = m.MoE(
                EXPERTS, HIDDEN, INTER, gate_type=t, up_type=t, down_type=t, threads=threads, numa_nodes=args.numa_nodes
            )
            moe.load(0, gate, up, down)
            layers.append(moe)
        result = {}
        for tokens, label in ((1, "decode"), (128, "prefill")):
            calls = routings(tokens, 64, rng)
            outs = [np.empty((tokens, HIDDEN), np.float32) for _ in range(len(layers))]

            def call(i: int) -> None:
                x, ids, w = calls[i % len(calls)]
                layer = layers[i % len(layers)]
                layer.submit(x, ids, w, outs[i % len(layers)])
                layer.sync()

            result[label] = median_ms(call, len(layers), 50 if tokens == 1 else 10, args.seconds)
        rows.append(
            Row("ktinject cpu_experts", quant, threads, result["decode"], result["prefill"], f"isa={layers[0].isa}")
        )
        print(
            f"  ktinject {quant} threads={threads}: decode {result['decode']:.3f} ms, prefill-128 {result['prefill']:.2f} ms",
            flush=True,
        )
        layers.clear()  # free this thread count's layers before the next builds its own
    return rows


def bench_torch(threads_list: list[int], args) -> list[Row]:
    """transformers' own Qwen3MoeExperts module in bf16 (its default experts implementation)."""
    from transformers import AutoConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = AutoConfig.for_model(
        "qwen3_moe", hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=EXPERTS, num_experts_per_tok=TOP_K
    )
    n_layers = args.layers or layers_for_dram(EXPERTS * 3 * INTER * HIDDEN * 2)
    print(f"  building {n_layers} bf16 transformers experts layers...", flush=True)
    layers = []
    with torch.no_grad():
        for _ in range(n_layers):
            module = Qwen3MoeExperts(config).to(torch.bfloat16)
            module.gate_up_proj.normal_(0, 0.02)
            module.down_proj.normal_(0, 0.02)
            layers.append(module)
    rng = np.random.default_rng(1)
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        result = {}
        for tokens, label in ((1, "decode"), (128, "prefill")):
            calls = [
                (torch.from_numpy(x).bfloat16(), torch.from_numpy(ids), torch.from_numpy(w).bfloat16())
                for x, ids, w in routings(tokens, 16, rng)
            ]

            def call(i: int) -> None:
                with torch.no_grad():
                    layers[i % len(layers)](*calls[i % len(calls)])

            result[label] = median_ms(call, len(layers), 20 if tokens == 1 else 5, args.seconds)
        rows.append(Row("transformers experts (torch bf16)", "bf16", threads, result["decode"], result["prefill"]))
        print(
            f"  torch bf16 threads={threads}: decode {result['decode']:.3f} ms, prefill-128 {result['prefill']:.2f} ms",
            flush=True,
        )
    return rows


def bench_peers(quant: str, threads_list: list[int]) -> list[Row]:
    try:
        import peers
    except Exception as exc:  # the peers module is optional
        print(f"  peers unavailable: {exc}")
        return []
    rows = []
    gguf_type = quant.upper() if quant != "bf16" else "BF16"
    for threads in threads_list:
        for label, fn in (
            ("llama.cpp", peers.llama_cpp_layer_ms),
            ("llama.cpp (no-AMX build)", lambda q, t: peers.llama_cpp_layer_ms(q, t, build="noamx")),
            ("ik_llama.cpp", lambda q, t: peers.llama_cpp_layer_ms(q, t, build="ik", repack=False)),
            ("ik_llama.cpp -rtr 1", lambda q, t: peers.llama_cpp_layer_ms(q, t, build="ik", repack=True)),
            ("kt-kernel", peers.kt_kernel_layer_ms),
        ):
            try:
                r = fn(gguf_type, threads)
            except Exception as exc:
                r, why = None, str(exc)
            else:
                why = peers.last_reason() if r is None else ""
            if r is None:
                print(f"  {label} {quant} threads={threads}: not measured ({why})", flush=True)
                continue
            note = getattr(r, "note", "") or ""
            rows.append(Row(label, quant, threads, getattr(r, "decode_ms", None), getattr(r, "prefill_ms", None), note))
            print(
                f"  {label} {quant} threads={threads}: decode {rows[-1].decode_ms} ms, prefill {rows[-1].prefill_ms} ms  {note}",
                flush=True,
            )
    return rows


def fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def report(rows: list[Row], bandwidth: dict[int, float]) -> str:
    lines = [
        "| implementation | quant | threads | decode ms | prefill-128 ms | decode: llama.cpp / ours | prefill: llama.cpp / ours | decode floor ms (8 experts / read BW) | decode / floor | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = next((p for p in rows if p.impl == "llama.cpp" and p.quant == r.quant and p.threads == r.threads), None)
        floor = 8 * expert_bytes(r.quant) / (bandwidth[r.threads] * 1e9) * 1e3 if r.quant in TYPE_IDS else None
        speed_d = (
            f"{ref.decode_ms / r.decode_ms:.2f}x"
            if ref and ref.decode_ms and r.decode_ms and r.impl != "llama.cpp"
            else ""
        )
        speed_p = (
            f"{ref.prefill_ms / r.prefill_ms:.2f}x"
            if ref and ref.prefill_ms and r.prefill_ms and r.impl != "llama.cpp"
            else ""
        )
        ratio = f"{r.decode_ms / floor:.2f}" if floor and r.decode_ms else ""
        lines.append(
            f"| {r.impl} | {r.quant} | {r.threads} | {fmt(r.decode_ms)} | {fmt(r.prefill_ms, 1)} | {speed_d} | {speed_p} | {fmt(floor)} | {ratio} | {r.note} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quants", default="q4_k,q8_0,bf16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--numa-nodes", type=int, default=0)
    ap.add_argument("--layers", type=int, default=0, help="layers to rotate through (0: enough for 3x the L3 cache)")
    ap.add_argument("--seconds", type=float, default=2.0, help="minimum timed seconds per measurement")
    ap.add_argument("--no-peers", action="store_true", help="skip llama.cpp and kt-kernel")
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers/torch baseline")
    args = ap.parse_args()
    quants = args.quants.split(",")
    threads_list = [int(t) for t in args.threads.split(",")]
    m = native()
    print(
        f"machine: {os.cpu_count()} CPUs, L3 {l3_bytes() / 2**20:.0f} MiB, kernels {m.best_isa()}, NUMA nodes {len(m.numa_topology())}"
    )
    bandwidth = {t: m.measure_read_bandwidth(1 << 30, t, 5) for t in threads_list}
    for t, bw in bandwidth.items():
        print(f"read bandwidth, {t} pinned thread(s): {bw:.1f} GB/s")
    rows: list[Row] = []
    for quant in quants:
        print(f"[{quant}]", flush=True)
        rows += bench_ours(quant, threads_list, args)
        if not args.no_peers and quant != "bf16":
            rows += bench_peers(quant, threads_list)
    if not args.no_torch:
        print("[torch]", flush=True)
        rows += bench_torch(threads_list, args)
    print()
    print("command: python benchmarks/bench_cpu_experts.py " + " ".join(sys.argv[1:]))
    print(", ".join(f"read bandwidth {t} thread(s) {bw:.1f} GB/s" for t, bw in bandwidth.items()))
    print(report(rows, bandwidth))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
