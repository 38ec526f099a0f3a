#!/usr/bin/env python3
"""Peak RSS of ``ktinject.from_pretrained(gguf=...)`` against the bytes the model keeps in CPU RAM.

    nice -n 10 python benchmarks/bench_load_memory.py                 # write the GGUF once (cached), measure
    python benchmarks/bench_load_memory.py --rules my_rules.yaml      # other rules (default: both below)

Method
- Model: a Qwen3-MoE-shaped random model (hidden 2048, 64 experts of intermediate 768, top-8, 6 layers,
  vocab 32000: Qwen3-30B-A3B's layer shapes with fewer experts and layers), written by the tests' GGUF writer
  (tests/gguf_writer.py) from a meta model, tensor by tensor: routed experts Q8_0, other matrices F16, vectors
  F32 (about 2.3 GB). Cached under $KTINJECT_BENCH_CACHE or /tmp/ktinject-bench.
- Measurement in a fresh process: baseline = VmRSS after importing ktinject, torch, transformers (and the
  model's modeling module), accelerate and gguf; the kernel's
  peak-RSS counter is then reset (/proc/self/clear_refs) and ``from_pretrained`` loads the model with the rules
  (default: the built-in qwen3_moe rules with gpu=cpu, bfloat16: every tensor ends up in CPU RAM, the experts
  dequantized into torch_experts). "kept" = bytes of the distinct CPU storages of the loaded model's
  parameters and buffers. ratio = (peak RSS - baseline) / kept; the target is <= 1.15.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIG = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_hidden_layers=6,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=64,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
)


TORCH_RULES = """
rules:
  - {name: experts, match: {name: '^model\\.layers\\.\\d+\\.mlp\\.experts$'}, replace: {op: torch_experts, device: cpu}}
  - {name: projections, match: {name: '\\.(self_attn|mlp)\\.\\w+_proj$', class: Linear}, replace: {op: torch_linear, device: cpu}}
  - {name: rest, match: {name: '^$'}, replace: {op: keep, device: cpu}}
"""


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_model(path: Path, layers: int, expert_type: str) -> None:
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from gguf_writer import write_gguf

    config = AutoConfig.for_model("qwen3_moe", **{**CONFIG, "num_hidden_layers": layers})
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)

    def fill(name: str, meta: torch.Tensor) -> torch.Tensor:
        if meta.dim() == 1:
            return torch.ones(meta.shape)
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return torch.randn(meta.shape, generator=g).mul_(0.02)

    def types(gguf_name: str, shape: tuple[int, ...]) -> str:
        if len(shape) <= 1:
            return "f32"
        return expert_type if "_exps." in gguf_name else "f16"

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.gguf")
    start = time.perf_counter()
    write_gguf(model, tmp, types=types, fill=fill)
    tmp.rename(path)
    print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f} s", flush=True)


def measure(path: Path, rules: str, gpu: str) -> dict:
    """Runs in a fresh process: load and report RSS figures as a dict."""
    import accelerate  # noqa: F401  (the libraries from_pretrained uses belong to the baseline)
    import torch
    import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401

    import ktinject

    baseline = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    start = time.perf_counter()
    model = ktinject.from_pretrained(
        gguf=path,
        rules=TORCH_RULES if rules == "torch" else rules,
        vars=None if rules == "torch" else {"gpu": gpu},  # the torch rules declare no variables
        dtype=torch.bfloat16,
        progress=False,
    )
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    storages: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "cpu":
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    kept = sum(storages.values())
    # The CPU operators' weights live outside torch, in their native layers (packed blocks): count those.
    for module in model.modules():
        native_layer = getattr(module, "_moe", None) or getattr(module, "_linear", None)
        if native_layer is not None:
            kept += int(native_layer.weight_bytes)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # the loaded model runs
    return dict(
        file_bytes=path.stat().st_size,
        baseline=baseline,
        peak=peak,
        kept=kept,
        seconds=seconds,
        ratio=(peak - baseline) / kept,
        after=_status("VmRSS"),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gguf", type=Path, help="GGUF to load (default: the cached benchmark model, written if absent)"
    )
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--expert-type", default="q8_0", help="GGUF type of the routed experts (q8_0, q4_k, ...)")
    parser.add_argument(
        "--rules",
        action="append",
        help="'torch', a built-in name or a rule file (repeatable; default: torch and qwen3_moe)",
    )
    parser.add_argument("--gpu", default="cpu", help="value of the rules' gpu variable (default cpu: all in RAM)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        print(json.dumps(measure(args.gguf, args.rules[0], args.gpu)))
        return 0
    cache = Path(os.environ.get("KTINJECT_BENCH_CACHE", "/tmp/ktinject-bench"))
    path = args.gguf or cache / f"qwen3moe-bench-{args.layers}l-{args.expert_type}.gguf"
    if not path.exists():
        write_model(path, args.layers, args.expert_type)
    gib = 2**30
    print(f"model: {path.name}, {path.stat().st_size / gib:.2f} GiB")
    print(
        f"{'rules':<10} {'kept GiB':>9} {'baseline':>9} {'peak':>9} {'after':>9} {'load s':>7} {'(peak-base)/kept':>17}"
    )
    worst = 0.0
    for rules in args.rules or ["torch", "qwen3_moe"]:
        cmd = [sys.executable, __file__, "--measure", "--gguf", str(path), "--rules", rules, "--gpu", args.gpu]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            print(f"{rules:<10} failed:\n{out.stderr[-2000:]}")
            worst = float("inf")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        worst = max(worst, r["ratio"])
        print(
            f"{rules:<10} {r['kept'] / gib:9.2f} {r['baseline'] / gib:9.2f} {r['peak'] / gib:9.2f} {r['after'] / gib:9.2f} "
            f"{r['seconds']:7.1f} {r['ratio']:17.3f}"
        )
    print("target: (peak - baseline) / kept <= 1.15")
    return 0 if worst <= 1.15 else 1


if __name__ == "__main__":
    sys.exit(main())
