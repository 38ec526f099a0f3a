#!/usr/bin/env python3
"""The whole model a user runs: ktinject (`from_pretrained(gguf=)` + stock `generate()`) against llama.cpp and
ik_llama.cpp on the same GGUF files, in one run.

    python benchmarks/bench_generate.py                              # Q4_K and Q8_0 files, all peers found
    python benchmarks/bench_generate.py --quants q4_k --no-peers     # ktinject alone
    python benchmarks/bench_generate.py --deep 48                    # + non-kernel time per layer on 48 layers

Files: random-weight qwen3moe GGUFs with Qwen3-30B-A3B widths (hidden 2048, 128 experts x 768, top-8, 32 query /
4 KV heads x 128) and `--layers` layers, vocab 1024; experts Q4_K or Q8_0, attention/embedding/output typed as a
Q4_K_M or Q8_0 file types them (benchmarks/peers.py DENSE_MIXES). Written once to the peers cache.

Measures (`--threads` for everyone):
- llama.cpp / ik_llama.cpp: `llama-bench -m F -t N -p 128 -n 32 -r R` (ik_llama.cpp also with `-rtr 1`).
- ktinject: prefill = one forward of 128 random tokens into an empty cache (median of R); decode = tokens/s of
  `generate()` over `--n-gen` greedy tokens after a 1-token prompt, EOS off as in llama-bench (median of R), the
  model built with the built-in rules on the CPU (`vars={'gpu': 'cpu'}`); then the same decode with
  `ktinject.compile_decoding` (its compile time in the row; `--no-compile` skips it).
- The decode floor: bytes read per token (every dense weight as stored, 8 experts per layer, one embedding row)
  over the read bandwidth of the same pinned threads, measured in the same run.
- Where a ktinject decode step goes (one extra profiled run with forward hooks, scaled to the unprofiled step):
  C++ decoder layers (whole MoE layers, when the rules fuse them), C++ experts, C++ dense linears, attention
  core, norms/router/rotary, the rest (Python/HF/torch framework).
- `--rounds N`: the peers and ktinject measured N times in turn (this VM's speed drifts within minutes); the
  tables show medians and, per row, the range of the per-round decode ratio against that round's best peer.
- `--deep L`: a file with L layers of the same widths (16 experts keep it small): non-kernel time per layer at
  one token = (decode step - time the pool's jobs took) / L, and decode tok/s against the peers on that file.

Peers are found like benchmarks/peers.py finds llama-bench ($LLAMA_BENCH, $IK_LLAMA_BENCH or under the peers root).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import peers  # noqa: E402

SHAPE = dict(hidden=2048, inter=768, experts=128, top_k=8, attention="full")
MIX = {"q4_k": "Q4_K_M", "q8_0": "Q8_0"}


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def model_file(quant: str, layers: int, experts: int = 128) -> Path:
    shape = {**SHAPE, "experts": experts}
    try:
        return peers.cached_qwen3moe_gguf(
            layers=layers, expert_type=quant.upper(), dense_mix=MIX[quant], tokenizer="llama", **shape
        )
    finally:
        peers.clear_gguf_memo()


# ------------------------------------------------------------------------------------------------ peers
def llama_bench_tok_s(
    exe: str, path: Path, threads: int, n_prompt: int, n_gen: int, reps: int, extra: list[str]
) -> dict[str, Any]:
    cmd = [
        exe,
        "-m",
        str(path),
        "-t",
        str(threads),
        "-p",
        str(n_prompt),
        "-n",
        str(n_gen),
        "-r",
        str(reps),
        "-o",
        "json",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)}: exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
        )
    rows = json.loads(proc.stdout[proc.stdout.index("[") :])
    out: dict[str, Any] = {"command": " ".join(cmd)}
    for r in rows:
        samples = [float(x) for x in (r.get("samples_ts") or [r["avg_ts"]])]
        key = "decode_tok_s" if r.get("n_gen", 0) > 0 else "prefill_tok_s"
        out[key] = statistics.median(samples)
        out["build"] = r.get("build_commit")
    return out


def peer_runs(args) -> list[tuple[str, str, list[str]]]:
    runs = []
    native = peers.find_llama_bench("native")
    if native:
        runs.append(("llama.cpp", native, []))
    ik = peers.find_llama_bench("ik")
    if ik:
        runs.append(("ik_llama.cpp", ik, []))
        runs.append(("ik_llama.cpp -rtr 1", ik, ["-rtr", "1"]))
    wanted = set(args.peers.split(",")) if args.peers else None
    return [r for r in runs if wanted is None or r[0] in wanted]


# ------------------------------------------------------------------------------------------------ ktinject
def load(path: Path, threads: int, dtype: str):
    import torch

    import ktinject

    return ktinject.from_pretrained(
        gguf=str(path), vars={"gpu": "cpu", "cpu_threads": threads}, dtype=getattr(torch, dtype), progress=False
    )


class TokenTimes:
    """A generate() streamer that records when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._first = True

    def put(self, value) -> None:
        if self._first:  # the prompt
            self._first = False
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def generate_tokens(model, ids, n: int, streamer) -> None:
    """Greedy ``generate()`` of exactly ``n`` new tokens with EOS switched off, as llama-bench's decode ignores it.
    Forcing the count with ``min_new_tokens`` instead would add two min-length logits processors whose per-step
    cost (~0.3 ms: transformers inspects each processor's signature at every step) belongs to the benchmark, not
    to the model."""
    import copy

    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None
    config.max_new_tokens, config.min_new_tokens, config.min_length = n, None, 0
    config.do_sample, config.pad_token_id = False, 0
    model.generate(ids, generation_config=config, streamer=streamer)


def merge_rounds(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per engine: the median prefill and decode over the rounds, and each round's decode against that
    round's best peer (``decode_vs_best_peer``, a list)."""
    merged: dict[str, dict[str, Any]] = {}
    for rows in rounds:
        best = max((r["decode_tok_s"] for r in rows if not r["engine"].startswith("ktinject")), default=None)
        for r in rows:
            m = merged.setdefault(r["engine"], {**r, "prefill": [], "decode": [], "decode_vs_best_peer": []})
            m["prefill"].append(r["prefill_tok_s"])
            m["decode"].append(r["decode_tok_s"])
            if best:
                m["decode_vs_best_peer"].append(r["decode_tok_s"] / best)
    for m in merged.values():
        m["prefill_tok_s"] = statistics.median(m.pop("prefill"))
        m["decode_tok_s"] = statistics.median(m.pop("decode"))
    return list(merged.values())


def decode_tok_s(model, n_gen: int, seed: int = 0) -> float:
    import torch

    ids = torch.randint(3, model.config.vocab_size, (1, 1), generator=torch.Generator().manual_seed(seed))
    streamer = TokenTimes()
    generate_tokens(model, ids, n_gen + 1, streamer)
    t = streamer.times
    return (len(t) - 1) / (t[-1] - t[0])


def prefill_tok_s(model, n_prompt: int, seed: int = 0) -> float:
    import torch

    ids = torch.randint(3, model.config.vocab_size, (1, n_prompt), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        start = time.perf_counter()
        model(ids, use_cache=True)
        return n_prompt / (time.perf_counter() - start)


def measure_ktinject(path: Path, args, dtype: str) -> list[dict[str, Any]]:
    """Rows for ``dtype``: eager decode (with its per-step split), then compiled decode (compile_decoding)."""
    import ktinject

    model = load(path, args.threads, dtype)
    prefill_tok_s(model, 16)  # warm-up
    decode_tok_s(model, 4)
    prefill = statistics.median(prefill_tok_s(model, args.n_prompt, seed) for seed in range(args.reps))
    decode = [decode_tok_s(model, args.n_gen, seed) for seed in range(args.reps)]
    rows = [
        {
            "engine": f"ktinject {dtype}",
            "prefill_tok_s": prefill,
            "decode_tok_s": statistics.median(decode),
            "split_ms": split(model, args.n_gen),
        }
    ]
    if args.compile:
        ktinject.compile_decoding(model)
        start = time.perf_counter()
        decode_tok_s(model, args.n_gen)  # compiles (the cache size of the timed calls)
        compile_s = time.perf_counter() - start
        decode = [decode_tok_s(model, args.n_gen, seed) for seed in range(args.reps)]
        rows.append(
            {
                "engine": f"ktinject {dtype}, compiled decoding",
                "prefill_tok_s": prefill,
                "decode_tok_s": statistics.median(decode),
                "compile_s": compile_s,
            }
        )
    del model
    return rows


def split(model, n_gen: int) -> dict[str, float]:
    """ms per decode step by category (forward hooks; their own cost lands in 'framework')."""
    import torch

    spent: dict[str, float] = defaultdict(float)
    stack: list[list[float]] = []

    def category(module) -> Optional[str]:
        name = type(module).__name__
        if name == "CpuDecoderLayer":  # a whole MoE layer in one or two pool jobs (its parts' hooks do not fire then)
            return "C++ decoder layers"
        if name == "CpuExperts":
            return "C++ experts"
        if name == "CpuLinear":
            return "C++ dense linears"
        if name.endswith("Attention"):
            return "attention core"
        if name.endswith(("RMSNorm", "RotaryEmbedding", "Router", "TopKRouter")) or name.endswith("Gate"):
            return "norms/router/rotary"
        return None

    def pre(module, args):
        stack.append([time.perf_counter(), 0.0])

    def post(module, args, output):
        start, children = stack.pop()
        took = time.perf_counter() - start
        spent[category(module)] += took - children
        if stack:
            stack[-1][1] += took

    handles = []
    for module in model.modules():
        if category(module) is not None:
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    ids = torch.randint(3, model.config.vocab_size, (1, 1), generator=torch.Generator().manual_seed(7))
    streamer = TokenTimes()
    try:
        generate_tokens(model, ids, n_gen + 1, streamer)
    finally:
        for h in handles:
            h.remove()
    steps = n_gen + 1
    total = (streamer.times[-1] - streamer.times[0]) / (len(streamer.times) - 1)
    # the first (prefill) step is in `spent` too: count per-step averages over all steps
    out = {k: v / steps * 1e3 for k, v in spent.items() if k is not None}
    out["framework"] = max(0.0, total * 1e3 - sum(out.values()))
    out["step"] = total * 1e3
    return out


def deep_peer_rows(path: Path, args) -> list[dict[str, Any]]:
    """The peers' decode (llama-bench -p 0 -n N) on the deep file: a real model's depth, where the per-token cost
    outside the layers weighs little."""
    rows = []
    for name, exe, extra in peer_runs(args):
        try:
            r = llama_bench_tok_s(exe, path, args.threads, 0, args.n_gen, args.reps, extra)
        except Exception as exc:  # a peer never stops the run
            print(f"# {name} failed: {exc}")
            continue
        rows.append({"engine": name, **r})
    return rows


def non_kernel_ms_per_layer(path: Path, layers: int, args) -> dict[str, dict[str, float]]:
    """Eager and compiled: a decode step, the part of it the pool's jobs took, the rest per layer (median of R)."""
    import ktinject
    from ktinject.native import native

    model = load(path, args.threads, args.dtypes.split(",")[0])

    def measure() -> dict[str, float]:
        steps = args.n_gen
        ids = __import__("torch").randint(3, model.config.vocab_size, (1, 1))
        streamer = TokenTimes()
        before = native().pool_stats(args.threads)
        generate_tokens(model, ids, steps + 1, streamer)
        after = native().pool_stats(args.threads)
        step = (streamer.times[-1] - streamer.times[0]) / (len(streamer.times) - 1)
        kernels = (after["busy_seconds"] - before["busy_seconds"]) / (steps + 2)  # + the prompt and first token
        return {
            "step_ms": step * 1e3,
            "kernel_ms": kernels * 1e3,
            "non_kernel_ms_per_layer": (step - kernels) / layers * 1e3,
        }

    def median_of_reps() -> dict[str, float]:
        runs = sorted((measure() for _ in range(args.reps)), key=lambda r: r["step_ms"])
        return runs[len(runs) // 2]

    decode_tok_s(model, 4)
    result = {"eager": median_of_reps()}
    if args.compile:
        ktinject.compile_decoding(model)
        start = time.perf_counter()
        measure()
        result["compile_s"] = {"seconds": time.perf_counter() - start}
        result["compiled"] = median_of_reps()
    return result


# ------------------------------------------------------------------------------------------------ floor
def bytes_per_token(path: Path) -> int:
    """Bytes a decode step reads: every 2-D+ tensor as stored except experts (8 of E) and the embedding (a row)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    experts = next(int(f.parts[-1][0]) for f in reader.fields.values() if f.name.endswith(".expert_count"))
    used = next(int(f.parts[-1][0]) for f in reader.fields.values() if f.name.endswith(".expert_used_count"))
    total = 0
    for t in reader.tensors:
        n = int(t.n_bytes)
        if "_exps." in t.name:
            total += n * used // experts
        elif t.name.startswith("token_embd"):
            total += n // int(t.shape[-1])
        else:
            total += n
    return total


# ------------------------------------------------------------------------------------------------ main
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quants", default="q4_k,q8_0")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-prompt", type=int, default=128)
    ap.add_argument("--n-gen", type=int, default=32)
    ap.add_argument(
        "--realtime",
        action="store_true",
        help="run under SCHED_FIFO (chrt -f 10; root) so other processes disturb the timings less",
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure peers and ktinject this many times, alternating; medians, and the per-round ratio range",
    )
    ap.add_argument("--dtypes", default="bfloat16,float32", help="ktinject model dtypes to run")
    ap.add_argument("--peers", default=None, help="comma list of peers to run (default: all found)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--deep", type=int, default=0, help="also measure non-kernel time per layer on this many layers")
    ap.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="skip the compiled-decoding rows (compile_decoding; seconds of compilation each)",
    )
    ap.add_argument("--json", default=None, help="write all results here")
    args = ap.parse_args(argv)
    if args.realtime:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))  # children (llama-bench) inherit it
    from ktinject.native import native

    results: dict[str, Any] = {"cpu": cpu_model(), "threads": args.threads, "rows": []}
    bandwidth = native().measure_read_bandwidth(1 << 30, args.threads, 5)
    results["read_gb_s"] = bandwidth
    print(f"# {results['cpu']}, {args.threads} threads, read bandwidth {bandwidth:.1f} GB/s")
    for quant in args.quants.split(","):
        path = model_file(quant, args.layers)
        floor_ms = bytes_per_token(path) / (bandwidth * 1e9) * 1e3
        rounds = []
        for _ in range(args.rounds):  # the peers and ktinject alternate: the VM's speed drifts between them
            rows = []
            if not args.no_peers:
                for name, exe, extra in peer_runs(args):
                    try:
                        r = llama_bench_tok_s(exe, path, args.threads, args.n_prompt, args.n_gen, args.reps, extra)
                    except Exception as exc:  # a peer never stops the run
                        print(f"# {name} failed: {exc}")
                        continue
                    rows.append({"engine": name, **r})
            for dtype in args.dtypes.split(","):
                rows += measure_ktinject(path, args, dtype)
            rounds.append(rows)
        rows = merge_rounds(rounds)
        best_peer = max((r["decode_tok_s"] for r in rows if not r["engine"].startswith("ktinject")), default=None)
        llama = next((r for r in rows if r["engine"] == "llama.cpp"), None)
        print(
            f"\n## {quant} experts, {MIX[quant]} dense, {args.layers} layers: decode floor {floor_ms:.2f} ms "
            f"({1e3 / floor_ms:.0f} tok/s)"
        )
        print(
            "| engine | prefill-128 tok/s | decode tok/s | decode / best peer | prefill / llama.cpp | floor / decode time |"
        )
        print("|---|---|---|---|---|---|")
        for r in rows:
            vs_peer = f"{r['decode_tok_s'] / best_peer:.2f}x" if best_peer else ""
            if best_peer and "decode_vs_best_peer" in r and len(rounds) > 1:
                lo, hi = min(r["decode_vs_best_peer"]), max(r["decode_vs_best_peer"])
                vs_peer += f" ({lo:.2f}-{hi:.2f})"
            vs_llama = f"{r['prefill_tok_s'] / llama['prefill_tok_s']:.2f}x" if llama else ""
            engine = r["engine"] + (f" (compiled in {r['compile_s']:.0f} s)" if "compile_s" in r else "")
            print(
                f"| {engine} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {vs_peer} | {vs_llama} | "
                f"{floor_ms / (1e3 / r['decode_tok_s']):.2f} |"
            )
        for r in rows:
            if "split_ms" in r:
                parts = ", ".join(f"{k} {v:.2f}" for k, v in r["split_ms"].items())
                print(f"# {r['engine']} decode step split (ms): {parts}")
        results["rows"].append({"quant": quant, "floor_ms": floor_ms, "engines": rows})
    if args.deep:
        quant = args.quants.split(",")[0]
        path = model_file(quant, args.deep, experts=16)
        deep = non_kernel_ms_per_layer(path, args.deep, args)
        peers = [] if args.no_peers else deep_peer_rows(path, args)
        results["deep"] = {"layers": args.deep, **deep, "peers": peers}
        for mode in ("eager", "compiled"):
            if mode in deep:
                d = deep[mode]
                print(
                    f"\n# {args.deep} layers ({quant}, 16 experts), {mode}: step {d['step_ms']:.2f} ms, pool jobs "
                    f"{d['kernel_ms']:.2f} ms, the rest {d['non_kernel_ms_per_layer']:.3f} ms per layer"
                )
        if peers:
            best = max(r["decode_tok_s"] for r in peers)
            print(f"\n## {args.deep} layers ({quant} experts, 16 of them): decode")
            print("| engine | decode tok/s | decode / best peer |\n|---|---|---|")
            ours = [
                (f"ktinject {args.dtypes.split(',')[0]}, {m}", 1e3 / deep[m]["step_ms"])
                for m in ("eager", "compiled")
                if m in deep
            ]
            for name, tok_s in [(r["engine"], r["decode_tok_s"]) for r in peers] + ours:
                print(f"| {name} | {tok_s:.2f} | {tok_s / best:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
