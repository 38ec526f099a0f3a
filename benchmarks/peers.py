#!/usr/bin/env python3
"""Peer measurements for the CPU-experts benchmark: llama.cpp (llama-bench) and kt-kernel.

Both peers run one Qwen3-30B-A3B-shaped MoE layer (hidden 2048, expert intermediate 768, 128 experts, top-8) on the
same GGUF expert tensors, so their numbers sit next to our operator's in `benchmarks/bench_cpu_experts.py`.

    from benchmarks import peers
    r = peers.llama_cpp_layer_ms("Q4_K", threads=2)           # {'decode_ms', 'prefill_ms', 'note', ...} or None
    if r is None:
        print("llama.cpp skipped:", peers.last_reason())
    k = peers.kt_kernel_layer_ms("Q4_K", threads=2)           # {'decode_ms', 'prefill_ms', 'cores_used', ...} or None

    python benchmarks/peers.py                                 # table: Q4_K and Q8_0 at 1 and 2 threads

Method
- Models: random-weight qwen3moe GGUFs written by `write_qwen3moe_gguf` and cached under `cache_dir`
  (default $KTINJECT_BENCH_CACHE, else models/ under the peers root: $KTINJECT_PEERS_ROOT or
  ~/.cache/ktinject-peers). K-quants are quantized by ggml's own
  `ggml_quantize_chunk` (libggml-base.so from the llama_cpp package, or $GGML_BASE_LIB); Q8_0/Q4_0/BF16 fall
  back to gguf-py. Expert blocks are quantized once per projection and each layer stores them in its own
  random expert order (values do not change the speed; every layer still has its own bytes in the file).
- llama.cpp: per-layer cost = (t(4-layer model) - t(1-layer model)) / 3 with llama-bench at the same thread
  count, median over repetitions; decode = `-n` generated tokens (ms per token), prefill = one `-p 128` batch.
  The difference also contains the layer's attention, router and norms; `attention="tiny"` (default) shrinks
  attention to one 128-wide head so the difference is almost all MoE, `attention="full"` keeps Qwen3-30B-A3B's
  32/4 heads. Whole-model prefill / layers would be wrong: llama.cpp runs the last layer's FFN only for the
  tokens that need logits.
- kt-kernel: its raw extension (`kt_kernel_ext.moe.MOE`, GGUF block types as stored) in a subprocess (its
  worker pool busy-waits on an extra thread and must not disturb the caller), random top-8 routing over all
  128 experts for every call, rotating through enough layers that the expert bytes are >= 3x L3.
  `cores_used` = process CPU time / wall time while timing.

Every measuring function returns None when its peer is missing or fails; `last_reason()` then says why in one
line. Only the GGUF writers (`write_qwen3moe_gguf`, `cached_qwen3moe_gguf`) raise. A measurement taken while
other processes used > 0.2 core says DISTURBED in its note (`wait_for_quiet()` helps); the CLI's
`--quiet-wait` waits and retries. Builds and install commands: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np

PEERS_ROOT = Path(os.environ.get("KTINJECT_PEERS_ROOT") or Path.home() / ".cache" / "ktinject-peers")
DISTURBED_CORES = 0.2  # other processes' average core use above which a measurement is flagged
GGUF_FORMAT_VERSION = 1  # bump when the writer's output changes: cached files get new names

Attention = Literal["tiny", "full"]
_ATTENTION_SHAPES = {"tiny": (1, 1, 128), "full": (32, 4, 128)}  # (heads, kv_heads, head_dim)

# llama-bench builds: key -> (environment variable, default path)
LLAMA_BENCH_BUILDS = {
    "native": ("LLAMA_BENCH", PEERS_ROOT / "llama.cpp-native" / "bin" / "llama-bench"),
    "noamx": ("LLAMA_BENCH_NOAMX", PEERS_ROOT / "llama.cpp-noamx" / "bin" / "llama-bench"),
    # ik_llama.cpp (fused MoE by default; its repack switch is -rtr, "run-time repack")
    "ik": ("IK_LLAMA_BENCH", PEERS_ROOT / "ik_llama.cpp" / "build" / "bin" / "llama-bench"),
}


class LayerTimes(dict):
    """A measurement: a dict whose keys also read as attributes (r.decode_ms is r['decode_ms']).

    decode_ms    one token through one MoE layer, median ms (None if not measured)
    prefill_ms   n_prompt tokens (one batch) through one MoE layer, median ms
    note         one line: build, ISA, repack / cores used, disturbance
    peer, expert_type, threads, cores_used, elapsed_s (wall time of the measurement, model writing excluded),
    command (what ran), details (raw numbers)
    """

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


# ----------------------------------------------------------------------------------------------- reasons
_last_reason = ""


def last_reason() -> str:
    """Why the most recent measuring call returned None ('' after a success)."""
    return _last_reason


def _fail(reason: str) -> None:
    global _last_reason
    _last_reason = " ".join(str(reason).split())[:400]
    return None


def _ok(result: LayerTimes) -> LayerTimes:
    global _last_reason
    _last_reason = ""
    return result


# ----------------------------------------------------------------------------------------------- machine
def l3_bytes() -> int:
    """Largest cache size the kernel reports (L3 on x86); 256 MiB if unknown."""
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            s = (idx / "size").read_text().strip()
        except OSError:
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", s)
        if m:
            best = max(best, int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])
    return best or 256 << 20


class _ForeignCpu:
    """CPU seconds other processes used while a measurement ran: all busy CPU time (/proc/stat) minus this
    process's and its waited-for children's. Kernel threads alone stay below ~0.15 core.
    More than DISTURBED_CORES means the numbers are disturbed."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return float("nan")
        return (sum(v[:3]) + sum(v[5:8])) / os.sysconf("SC_CLK_TCK")  # user nice system irq softirq steal

    @staticmethod
    def _own() -> float:
        import resource

        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    def cores(self) -> float:
        """Average number of cores used by others since construction."""
        wall = time.perf_counter() - self.t0
        return max(0.0, (self._busy() - self.busy0) - (self._own() - self.own0)) / wall if wall > 0 else 0.0


def wait_for_quiet(max_wait_s: float = 600.0, *, max_cores: float = 0.1, window_s: float = 5.0) -> bool:
    """Wait until other processes use < max_cores over a window_s window; False if max_wait_s passes first."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        f = _ForeignCpu()
        time.sleep(window_s)
        if f.cores() < max_cores:
            return True
        if time.perf_counter() > deadline:
            return False


def _foreign_note(cores: float) -> str:
    return f"; DISTURBED: other processes used {cores:.2f} cores meanwhile" if cores > DISTURBED_CORES else ""


def default_cache_dir() -> Path:
    return Path(os.environ.get("KTINJECT_BENCH_CACHE") or PEERS_ROOT / "models")


def _child_env(**extra: str) -> dict[str, str]:
    """The caller's environment without thread-pinning / thread-count variables (peers get their own)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_")) and k != "KT_KERNEL_CPU_VARIANT"
    }
    env.update(extra)
    return env


def _unpin() -> None:
    """preexec_fn: let a peer use every online CPU even if the caller pinned itself to fewer."""
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except (AttributeError, OSError):
        pass


# ----------------------------------------------------------------------------------------------- GGUF writer
def find_ggml_base_lib() -> Optional[str]:
    """libggml-base.so: $GGML_BASE_LIB, else the one shipped inside the llama_cpp (llama-cpp-python) package."""
    env = os.environ.get("GGML_BASE_LIB")
    if env and os.path.exists(env):
        return env
    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        spec = None
    if spec and spec.origin:
        for cand in ("lib/libggml-base.so", "libggml-base.so"):
            p = Path(spec.origin).parent / cand
            if p.exists():
                return str(p)
    return None


class _Quantizer:
    """float32 [..., n] -> gguf-py raw layout (uint8 [..., row_bytes]) for a GGML type."""

    def __init__(self, lib_path: Optional[str]):
        self.lib = None
        if lib_path:
            lib = ctypes.CDLL(lib_path)
            f = lib.ggml_quantize_chunk
            # size_t ggml_quantize_chunk(enum ggml_type, const float *src, void *dst, int64_t start,
            #                            int64_t nrows, int64_t n_per_row, const float *imatrix)
            f.restype = ctypes.c_size_t
            f.argtypes = [
                ctypes.c_int,
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_void_p,
            ]
            self.lib = lib

    def __call__(self, x: np.ndarray, qtype: Any) -> np.ndarray:
        import gguf

        T = gguf.GGMLQuantizationType
        if qtype == T.F32:
            return np.ascontiguousarray(x, dtype=np.float32)
        if qtype == T.F16:
            return x.astype(np.float16)
        if self.lib is None or qtype == T.BF16:
            if qtype.name in ("Q4_K", "Q5_K", "Q6_K"):  # our own K-quant quantizer (ktinject's extension)
                from ktinject.native import native

                flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
                return native().quantize(int(qtype), flat).reshape(*x.shape[:-1], -1)
            if qtype.name.endswith("_K") or qtype.name.startswith("IQ"):
                raise RuntimeError(
                    f"{qtype.name} needs ggml's quantizer: install llama-cpp-python or set GGML_BASE_LIB"
                )
            return gguf.quants.quantize(x, qtype)
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = x.shape[-1]
        rows = x.size // n
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if n % block:
            raise ValueError(f"row length {n} is not a multiple of {qtype.name}'s block {block}")
        out = np.empty(x.shape[:-1] + (n // block * type_size,), dtype=np.uint8)
        workers = max(1, os.cpu_count() or 1)
        step = max(1, -(-rows // (4 * workers)))

        def part(r0: int) -> None:  # ctypes drops the GIL: the chunks run in parallel
            nr = min(rows, r0 + step) - r0
            self.lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, r0 * n, nr, n, None)

        with ThreadPoolExecutor(workers) as ex:
            list(ex.map(part, range(0, rows, step)))
        return out


def expert_bytes_per_layer(
    expert_type: str, *, hidden: int = 2048, inter: int = 768, experts: int = 128, down_type: Optional[str] = None
) -> int:
    """Bytes of gate+up+down expert tensors of one layer."""
    import gguf

    T = gguf.GGMLQuantizationType

    def nbytes(t: str, rows: int, cols: int) -> int:
        bs, ts = gguf.GGML_QUANT_SIZES[T[t]]
        return rows * (cols // bs) * ts

    return experts * (2 * nbytes(expert_type, inter, hidden) + nbytes(down_type or expert_type, hidden, inter))


_EXPERT_MEMO: dict[str, Any] = {}


def clear_gguf_memo() -> None:
    """Drop the quantized expert blocks kept between `write_qwen3moe_gguf` calls."""
    _EXPERT_MEMO.clear()


# Types of the dense tensors (attention q/k/v/o, token embedding, output) as llama.cpp's quantize stores them
# for a file type: Q4_K_M keeps attn_v and the output in Q6_K.
DENSE_MIXES: dict[str, dict[str, str]] = {
    "Q4_K_M": {
        "attn_q": "Q4_K",
        "attn_k": "Q4_K",
        "attn_v": "Q6_K",
        "attn_output": "Q4_K",
        "token_embd": "Q4_K",
        "output": "Q6_K",
    },
    "Q8_0": {
        "attn_q": "Q8_0",
        "attn_k": "Q8_0",
        "attn_v": "Q8_0",
        "attn_output": "Q8_0",
        "token_embd": "Q8_0",
        "output": "Q8_0",
    },
}


def write_qwen3moe_gguf(
    path: str | os.PathLike,
    *,
    layers: int,
    expert_type: str,
    hidden: int = 2048,
    inter: int = 768,
    experts: int = 128,
    top_k: int = 8,
    seed: int = 0,
    down_type: Optional[str] = None,
    attention: Attention = "tiny",
    attn_type: str = "Q8_0",
    vocab: int = 1024,
    std: float = 0.02,
    ggml_lib: Optional[str] = None,
    dense_mix: Optional[str] = None,
    tokenizer: str = "none",
) -> Path:
    """Write a random-weight qwen3moe GGUF that llama.cpp loads and kt-kernel's GGUF path reads.

    Tensors are streamed to disk one by one (peak memory ~ one layer's quantized experts + 256 MiB). The vocabulary is
    tiny; with tokenizer='none' the file has no vocab (llama-bench runs it), with 'llama' a dummy SPM vocab that
    llama-cpp-python needs. dense_mix ('Q4_K_M', 'Q8_0') types attention/embedding/output as that llama.cpp file
    type does (DENSE_MIXES); otherwise attention is attn_type and embedding/output Q8_0. Raises on error.
    """
    import gguf

    T = gguf.GGMLQuantizationType
    et, dt, at = T[expert_type], T[down_type or expert_type], T[attn_type]
    mix = (
        {k: T[v] for k, v in DENSE_MIXES[dense_mix].items()}
        if dense_mix
        else {"attn_q": at, "attn_k": at, "attn_v": at, "attn_output": at, "token_embd": T.Q8_0, "output": T.Q8_0}
    )
    heads, kv_heads, head_dim = _ATTENTION_SHAPES[attention]
    H, I, E = hidden, inter, experts
    quant = _Quantizer(ggml_lib if ggml_lib is not None else find_ggml_base_lib())
    rng = np.random.default_rng([seed, 0])

    def normal(*shape: int, gen: np.random.Generator = rng) -> np.ndarray:
        return gen.standard_normal(shape, dtype=np.float32) * np.float32(std)

    # one set of expert blocks per projection (kept for the next file of the same kind: writing L1 and L4
    # quantizes once), each layer in its own random expert order
    memo_key = (expert_type, down_type or expert_type, H, I, E, seed, std)
    if _EXPERT_MEMO.get("key") != memo_key:
        _EXPERT_MEMO.clear()
        _EXPERT_MEMO["key"] = memo_key
        _EXPERT_MEMO["rng"] = np.random.default_rng([seed, 1])
    base: dict[str, np.ndarray] = _EXPERT_MEMO.setdefault("base", {})

    def stacked(rows: int, cols: int, qtype: Any) -> np.ndarray:
        """[E, rows, cols] random weights quantized expert-chunk by expert-chunk (bounded float32 memory)."""
        parts, chunk = [], max(1, (256 << 20) // (rows * cols * 4))
        for e0 in range(0, E, chunk):
            parts.append(quant(normal(min(chunk, E - e0), rows, cols, gen=_EXPERT_MEMO["rng"]), qtype))
        return np.concatenate(parts, axis=0)

    perms = [np.arange(E)] + [rng.permutation(E) for _ in range(layers - 1)]

    entries: list[tuple[str, tuple[int, ...], Any, Callable[[], np.ndarray]]] = []

    def add(name: str, shape: tuple[int, ...], qtype: Any, make: Callable[[], np.ndarray]) -> None:
        entries.append((name, shape, qtype, make))

    def fitting(qtype: Any, cols: int) -> Any:
        """qtype, or what llama.cpp's quantize falls back to for rows its blocks do not divide (Q8_0, else F16)."""
        if cols % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            return qtype
        return T.Q8_0 if cols % 32 == 0 else T.F16

    def dense(rows: int, cols: int, qtype: Any) -> Callable[[], np.ndarray]:
        return lambda: quant(normal(rows, cols), fitting(qtype, cols))

    def ones(n: int) -> Callable[[], np.ndarray]:
        return lambda: np.ones(n, np.float32)

    def experts_of(key: str, li: int, rows: int, cols: int, qtype: Any) -> Callable[[], np.ndarray]:
        def make() -> np.ndarray:
            if key not in base:
                base[key] = stacked(rows, cols, qtype)
            return np.ascontiguousarray(base[key][perms[li]])

        return make

    add("token_embd.weight", (vocab, H), mix["token_embd"], dense(vocab, H, mix["token_embd"]))
    add("output_norm.weight", (H,), T.F32, ones(H))
    add("output.weight", (vocab, H), mix["output"], dense(vocab, H, mix["output"]))
    for li in range(layers):
        p = f"blk.{li}."
        add(p + "attn_norm.weight", (H,), T.F32, ones(H))
        add(p + "attn_q.weight", (heads * head_dim, H), mix["attn_q"], dense(heads * head_dim, H, mix["attn_q"]))
        add(p + "attn_k.weight", (kv_heads * head_dim, H), mix["attn_k"], dense(kv_heads * head_dim, H, mix["attn_k"]))
        add(p + "attn_v.weight", (kv_heads * head_dim, H), mix["attn_v"], dense(kv_heads * head_dim, H, mix["attn_v"]))
        add(
            p + "attn_output.weight",
            (H, heads * head_dim),
            fitting(mix["attn_output"], heads * head_dim),
            dense(H, heads * head_dim, mix["attn_output"]),
        )
        add(p + "attn_q_norm.weight", (head_dim,), T.F32, ones(head_dim))
        add(p + "attn_k_norm.weight", (head_dim,), T.F32, ones(head_dim))
        add(p + "ffn_norm.weight", (H,), T.F32, ones(H))
        add(p + "ffn_gate_inp.weight", (E, H), T.F32, dense(E, H, T.F32))  # router stays F32
        add(p + "ffn_gate_exps.weight", (E, I, H), et, experts_of("gate", li, I, H, et))
        add(p + "ffn_up_exps.weight", (E, I, H), et, experts_of("up", li, I, H, et))
        add(p + "ffn_down_exps.weight", (E, H, I), dt, experts_of("down", li, H, I, dt))

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), "qwen3moe")
    w.add_name("ktinject-random-qwen3moe")
    w.add_context_length(4096)
    w.add_embedding_length(H)
    w.add_block_count(layers)
    w.add_feed_forward_length(6144)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(E)
    w.add_expert_used_count(top_k)
    w.add_expert_feed_forward_length(I)
    ftype = {T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, T.BF16: gguf.LlamaFileType.MOSTLY_BF16}.get(
        et, gguf.LlamaFileType.GUESSED
    )
    w.add_file_type(int(ftype))
    if tokenizer == "llama":  # a dummy SPM vocab: llama-cpp-python refuses files without one
        w.add_tokenizer_model("llama")
        w.add_token_list([b"<unk>", b"<s>", b"</s>"] + [f"<t{i}>".encode() for i in range(3, vocab)])
        w.add_token_scores([0.0] * vocab)
        w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(False)
    else:
        w.add_tokenizer_model("none")
    w.add_vocab_size(vocab)
    for name, shape, qtype, _ in entries:
        if qtype in (T.F32, T.F16):
            itemsize = 4 if qtype == T.F32 else 2
            w.add_tensor_info(
                name, shape, np.dtype(np.float32 if qtype == T.F32 else np.float16), int(np.prod(shape)) * itemsize
            )
        else:
            bs, ts = gguf.GGML_QUANT_SIZES[qtype]
            byte_shape = shape[:-1] + (shape[-1] // bs * ts,)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, _, _, make in entries:
        w.write_tensor_data(make())
    w.close()
    return out


def cached_qwen3moe_gguf(
    *,
    layers: int,
    expert_type: str,
    hidden: int = 2048,
    inter: int = 768,
    experts: int = 128,
    top_k: int = 8,
    seed: int = 0,
    attention: Attention = "tiny",
    cache_dir: str | os.PathLike | None = None,
    dense_mix: Optional[str] = None,
    tokenizer: str = "none",
) -> Path:
    """Path of a cached `write_qwen3moe_gguf` file; writes it (atomically) when missing. Raises on error."""
    d = Path(cache_dir) if cache_dir else default_cache_dir()
    extra = (f"-{dense_mix}" if dense_mix else "") + ("-spm" if tokenizer == "llama" else "")
    name = (
        f"qwen3moe-v{GGUF_FORMAT_VERSION}-H{hidden}-I{inter}-E{experts}-K{top_k}-L{layers}-{expert_type}"
        f"-attn_{attention}{extra}-s{seed}.gguf"
    )
    path = d / name
    if path.exists():
        return path
    d.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        write_qwen3moe_gguf(
            tmp,
            layers=layers,
            expert_type=expert_type,
            hidden=hidden,
            inter=inter,
            experts=experts,
            top_k=top_k,
            seed=seed,
            attention=attention,
            dense_mix=dense_mix,
            tokenizer=tokenizer,
        )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ----------------------------------------------------------------------------------------------- llama.cpp
def find_llama_bench(build: str = "native") -> Optional[str]:
    """llama-bench of one build ('native': -march=native, AMX compiled in on AMX CPUs; 'noamx')."""
    env, default = LLAMA_BENCH_BUILDS[build]
    for cand in (os.environ.get(env), str(default), shutil.which("llama-bench") if build == "native" else None):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _run_llama_bench(
    exe: str, model: Path, threads: int, n_prompt: int, n_gen: int, reps: int, repack: bool, timeout_s: float
) -> tuple[dict[str, float], dict[str, Any], list[str]]:
    repack_flag = "-rtr" if "ik_llama" in exe else "--repack"
    cmd = [
        exe,
        "-m",
        str(model),
        "-t",
        str(threads),
        "-p",
        str(n_prompt),
        "-n",
        str(n_gen),
        "-r",
        str(reps),
        repack_flag,
        "1" if repack else "0",
        "-o",
        "json",
        "-v",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=_child_env(), preexec_fn=_unpin)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"llama-bench exit {proc.returncode}: {tail}")
    rows = json.loads(proc.stdout[proc.stdout.index("[") :])
    times: dict[str, float] = {}
    meta: dict[str, Any] = {}
    for r in rows:
        samples = r.get("samples_ns") or [r["avg_ns"]]
        med_ms = statistics.median(samples) / 1e6
        if r.get("n_gen", 0) > 0:
            times["decode_ms"] = med_ms / r["n_gen"]
        else:
            times["prefill_ms"] = med_ms
        meta = {k: r.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends", "repack", "n_threads")}
    buffers = {
        m.group(1): float(m.group(2)) for m in re.finditer(r"(\S+) model buffer size\s*=\s*([\d.]+) MiB", proc.stderr)
    }
    meta["buffers_mib"] = buffers
    meta["repacked_tensors"] = len(re.findall(r"repack: repack tensor ", proc.stderr))  # CPU_REPACK
    meta["amx_tensors"] = len(re.findall(r"amx repack tensor ", proc.stderr))  # AMX buffer
    return times, meta, cmd


def _has_amx_kernels(exe: str) -> bool:
    """Whether a llama-bench binary contains ggml's AMX matmul (static build: the symbol name is in it)."""
    try:
        return b"ggml_backend_amx_mul_mat" in Path(exe).read_bytes()
    except OSError:
        return False


def llama_cpp_layer_ms(
    expert_type: str,
    threads: int,
    *,
    n_prompt: int = 128,
    n_gen: int = 32,
    reps: int = 5,
    build: str = "native",
    repack: bool = True,
    attention: Attention = "tiny",
    layers: tuple[int, int] = (1, 4),
    hidden: int = 2048,
    inter: int = 768,
    experts: int = 128,
    top_k: int = 8,
    cache_dir: str | os.PathLike | None = None,
    timeout_s: float = 1200.0,
) -> Optional[LayerTimes]:
    """One MoE layer through llama.cpp: (t(L4) - t(L1)) / 3 from llama-bench, medians; None + last_reason().

    build: 'native' (GGML_NATIVE=ON) or 'noamx' (AVX-512 flags, AMX off). repack: llama-bench --repack
    (CPU extra buffer types: AMX and CPU_REPACK; with 0 neither is used).
    """
    try:
        exe = find_llama_bench(build)
        if exe is None:
            env, default = LLAMA_BENCH_BUILDS[build]
            return _fail(
                f"llama-bench ({build}) not found: set ${env} or build it to {default} (see benchmarks/README.md)"
            )
        lo, hi = layers
        if hi <= lo:
            return _fail(f"layers must be (small, big), got {layers}")
        shape = dict(hidden=hidden, inter=inter, experts=experts, top_k=top_k, attention=attention, cache_dir=cache_dir)
        try:
            models = {n: cached_qwen3moe_gguf(layers=n, expert_type=expert_type, **shape) for n in (lo, hi)}
        finally:
            clear_gguf_memo()
        foreign = _ForeignCpu()
        t0 = time.perf_counter()
        res, metas, cmds = {}, {}, {}
        for n, m in models.items():
            res[n], metas[n], cmds[n] = _run_llama_bench(exe, m, threads, n_prompt, n_gen, reps, repack, timeout_s)
        elapsed = time.perf_counter() - t0
        other_cores = foreign.cores()

        def per_layer(key: str) -> Optional[float]:
            if key not in res[lo] or key not in res[hi]:
                return None
            return (res[hi][key] - res[lo][key]) / (hi - lo)

        mb = metas[hi]
        extra = [
            f"{k} {mb['repacked_tensors'] if k == 'CPU_REPACK' else mb['amx_tensors']} tensors"
            for k in ("CPU_REPACK", "AMX")
            if k in mb["buffers_mib"]
        ]
        note = (
            f"llama.cpp {mb.get('build_commit')} {build} (AMX kernels "
            f"{'built' if _has_amx_kernels(exe) else 'absent'}), repack {'on' if repack else 'off'}: "
            f"{', '.join(extra) or 'no extra buffers'}; attention {attention}; (L{hi}-L{lo})/{hi - lo}"
            f"{_foreign_note(other_cores)}"
        )
        return _ok(
            LayerTimes(
                peer=f"llama.cpp-{build}",
                expert_type=expert_type,
                threads=threads,
                cores_used=float(threads),
                decode_ms=per_layer("decode_ms"),
                prefill_ms=per_layer("prefill_ms"),
                note=note,
                elapsed_s=elapsed,
                command=" ".join(cmds[hi]),
                details={
                    "raw_ms": {f"L{n}": r for n, r in res.items()},
                    "meta": metas,
                    "n_prompt": n_prompt,
                    "n_gen": n_gen,
                    "reps": reps,
                    "models": {n: str(m) for n, m in models.items()},
                    "foreign_cores": other_cores,
                },
            )
        )
    except subprocess.TimeoutExpired:
        return _fail(f"llama-bench timed out after {timeout_s:.0f}s")
    except Exception as e:  # a peer never crashes the caller
        return _fail(f"llama.cpp ({build}) failed: {type(e).__name__}: {e}")


# ----------------------------------------------------------------------------------------------- kt-kernel
KT_METHODS = ("LLAMAFILE", "AMXINT8", "AMXINT4", "AMXBF16")


def kt_kernel_layer_ms(
    expert_type: str,
    threads: int,
    *,
    qlens: Sequence[int] = (1, 128),
    method: str = "LLAMAFILE",
    layers: Optional[int] = None,
    min_time_s: float = 2.0,
    check: bool = True,
    cpu_variant: Optional[str] = None,
    hidden: int = 2048,
    inter: int = 768,
    experts: int = 128,
    top_k: int = 8,
    cache_dir: str | os.PathLike | None = None,
    timeout_s: float = 1800.0,
) -> Optional[LayerTimes]:
    """One MoE layer through kt-kernel's raw extension, in a subprocess; None + last_reason().

    method 'LLAMAFILE' runs the GGUF blocks as stored (kt_kernel_ext.moe.MOE); 'AMXINT8'/'AMXINT4'/'AMXBF16'
    quantize the dequantized experts online to kt-kernel's own AMX layouts (not the same bytes as the GGUF).
    decode_ms is qlen 1, prefill_ms the largest qlen. `layers` defaults to max(4, enough for 3x L3).
    cpu_variant forces kt-kernel's build ('amx', 'avx512_bf16', 'avx512_vnni', 'avx2', ...; KT_KERNEL_CPU_VARIANT),
    default: the one kt-kernel detects.
    """
    try:
        if importlib.util.find_spec("kt_kernel") is None:
            return _fail("kt-kernel not installed (pip install --no-deps kt-kernel==0.7.2)")
        if method not in KT_METHODS:
            return _fail(f"unknown kt-kernel method {method!r} (known: {', '.join(KT_METHODS)})")
        if layers is None:
            per_layer = expert_bytes_per_layer(expert_type, hidden=hidden, inter=inter, experts=experts)
            if method == "AMXINT8":
                per_layer = 3 * experts * inter * hidden
            elif method == "AMXINT4":
                per_layer = 3 * experts * inter * hidden // 2
            elif method == "AMXBF16":
                per_layer = 6 * experts * inter * hidden
            layers = max(4, math.ceil(3 * l3_bytes() / per_layer))
        try:
            model = cached_qwen3moe_gguf(
                layers=layers,
                expert_type=expert_type,
                hidden=hidden,
                inter=inter,
                experts=experts,
                top_k=top_k,
                attention="tiny",
                cache_dir=cache_dir,
            )
        finally:
            clear_gguf_memo()
        job = {
            "gguf": str(model),
            "threads": threads,
            "qlens": [int(q) for q in qlens],
            "method": method,
            "min_time_s": min_time_s,
            "check": check,
        }
        cmd = [sys.executable, os.path.abspath(__file__), "--kt-worker", json.dumps(job)]
        env = _child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        if cpu_variant:
            env["KT_KERNEL_CPU_VARIANT"] = cpu_variant
        foreign = _ForeignCpu()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, preexec_fn=_unpin)
        elapsed = time.perf_counter() - t0
        other_cores = foreign.cores()
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("KT_RESULT ", "KT_SKIP "))]
        if not lines:
            tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
            return _fail(f"kt-kernel worker exit {proc.returncode}: {tail}")
        if lines[-1].startswith("KT_SKIP "):
            return _fail(lines[-1][len("KT_SKIP ") :])
        r = json.loads(lines[-1][len("KT_RESULT ") :])
        if cpu_variant and r["variant"] != cpu_variant:
            return _fail(
                f"kt-kernel loaded variant {r['variant']!r}, not the requested {cpu_variant!r} (valid: amx, "
                "avx512_bf16, avx512_vbmi, avx512_vnni, avx512_base, avx2)"
            )
        ms = {int(k): v for k, v in r["ms"].items()}
        cores = {int(k): v for k, v in r["cpu_per_wall"].items()}
        big = max(q for q in ms if q > 1) if any(q > 1 for q in ms) else None
        check_txt = f", check rel err {r['check_rel_err']:.1e}" if r.get("check_rel_err") is not None else ""
        note = (
            f"kt-kernel {r['version']} {r['variant']} {method}, cores used "
            f"{'/'.join(f'{cores[q]:.2f}' for q in sorted(cores))} (qlen {'/'.join(map(str, sorted(cores)))}), "
            f"{r['layers']} layers/{r['expert_bytes_total'] / 2**20:.0f} MiB rotated{check_txt}"
            f"{_foreign_note(other_cores)}"
        )
        r["foreign_cores"] = other_cores
        return _ok(
            LayerTimes(
                peer=f"kt-kernel-{method}" + (f"@{cpu_variant}" if cpu_variant else ""),
                expert_type=expert_type,
                threads=threads,
                cores_used=max(cores.values()) if cores else None,
                decode_ms=ms.get(1),
                prefill_ms=ms.get(big) if big else None,
                note=note,
                elapsed_s=elapsed,
                command=" ".join(cmd[:3]) + " '" + cmd[3] + "'",
                details=r,
            )
        )
    except subprocess.TimeoutExpired:
        return _fail(f"kt-kernel worker timed out after {timeout_s:.0f}s")
    except Exception as e:
        return _fail(f"kt-kernel failed: {type(e).__name__}: {e}")


def _kt_worker(job: dict[str, Any]) -> None:
    """Runs in the subprocess started by kt_kernel_layer_ms; prints one KT_RESULT/KT_SKIP line."""
    try:
        import torch

        torch.set_num_threads(1)
        import gguf
        import kt_kernel

        ext = kt_kernel.kt_kernel_ext
    except Exception as e:
        print(f"KT_SKIP kt-kernel import failed: {type(e).__name__}: {e}", flush=True)
        return
    T = gguf.GGMLQuantizationType
    threads, method, qlens = int(job["threads"]), job["method"], list(job["qlens"])
    rd = gguf.GGUFReader(job["gguf"])
    tensors = {t.name: t for t in rd.tensors}

    def kv_int(key: str) -> int:
        f = rd.fields[key]
        return int(f.parts[f.data[0]][0])

    H, E = kv_int("qwen3moe.embedding_length"), kv_int("qwen3moe.expert_count")
    K, I = kv_int("qwen3moe.expert_used_count"), kv_int("qwen3moe.expert_feed_forward_length")
    NL = kv_int("qwen3moe.block_count")
    max_len = -(-max(max(qlens), 64) // 64) * 64  # AMX buffers want a multiple of their M step

    pool_cfg = ext.WorkerPoolConfig()
    pool_cfg.subpool_count = 1
    pool_cfg.subpool_numa_map = [0]
    pool_cfg.subpool_thread_count = [threads]
    cpu = ext.CPUInfer(pool_cfg)
    no_gpu = torch.zeros(E, dtype=torch.bool)  # every expert on the CPU
    identity = torch.arange(E, dtype=torch.int64)  # physical -> logical expert ids
    keep_alive: list[Any] = [no_gpu, identity]
    moes = []
    total_bytes = 0
    proj = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")

    for li in range(NL):
        ts = [tensors[f"blk.{li}.{p}.weight"] for p in proj]
        cfg = ext.moe.MOEConfig(E, K, H, I, no_gpu.data_ptr())
        cfg.layer_idx = li
        cfg.pool = cpu.backend_
        cfg.max_len = max_len
        if method == "LLAMAFILE":
            arrs = [np.asarray(t.data) for t in ts]  # memory-mapped GGUF blocks, kept alive below
            keep_alive.append(arrs)
            cfg.m_block, cfg.group_min_len, cfg.group_max_len = 32, 10, max_len
            cfg.gate_proj, cfg.up_proj, cfg.down_proj = (a.ctypes.data for a in arrs)
            cfg.gate_type, cfg.up_type, cfg.down_type = (int(t.tensor_type) for t in ts)
            cfg.hidden_type = int(T.BF16)
            moe = ext.moe.MOE(cfg)
            cpu.submit(moe.load_weights_task(identity.data_ptr()))
            cpu.sync()
            total_bytes += sum(a.nbytes for a in arrs)
        else:
            src = [
                torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), T(t.tensor_type)))
                .to(torch.bfloat16)
                .contiguous()
                for t in ts
            ]
            cfg.gate_proj, cfg.up_proj, cfg.down_proj = (s.data_ptr() for s in src)
            cfg.physical_to_logical_map = identity.data_ptr()
            cls = {"AMXINT8": ext.moe.AMXInt8_MOE, "AMXINT4": ext.moe.AMXInt4_MOE, "AMXBF16": ext.moe.AMXBF16_MOE}[
                method
            ]
            moe = cls(cfg)
            cpu.submit(moe.load_weights_task())
            cpu.sync()
            del src  # the AMX classes keep their own converted copy
            total_bytes += int(3 * E * I * H * {"AMXINT8": 1, "AMXINT4": 0.5, "AMXBF16": 2}[method])
        moes.append(moe)

    def forward(li: int, qlen: int, ids: torch.Tensor, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        n = torch.tensor([qlen], dtype=torch.int32)
        cpu.submit(
            moes[li].forward_task(n.data_ptr(), K, ids.data_ptr(), w.data_ptr(), x.data_ptr(), y.data_ptr(), False)
        )
        cpu.sync()

    gen = torch.Generator().manual_seed(1234)

    def routing(qlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.rand(qlen, E, generator=gen).argsort(dim=1)[:, :K].contiguous()  # K distinct of all E
        w = torch.softmax(torch.randn(qlen, K, generator=gen), dim=-1).contiguous()
        return ids.to(torch.int64), w.to(torch.float32)

    out: dict[str, Any] = {
        "version": kt_kernel.__version__,
        "variant": kt_kernel.__cpu_variant__,
        "int8_kernel": getattr(kt_kernel, "__int8_kernel__", "?"),
        "layers": NL,
        "expert_bytes_total": total_bytes,
        "method": method,
        "threads": threads,
        "ms": {},
        "mean_ms": {},
        "n_calls": {},
        "cpu_per_wall": {},
        "eff_GBps": {},
        "check_rel_err": None,
    }

    if job.get("check"):  # layer 0 against a float32 reference from the dequantized GGUF experts
        q = 4
        ids, w = routing(q)
        x = torch.randn(q, H, generator=gen).to(torch.bfloat16)
        y = torch.zeros(q, H, dtype=torch.bfloat16)
        forward(0, q, ids, w, x, y)
        deq = {}
        for p in proj:
            t = tensors[f"blk.0.{p}.weight"]
            for e in ids.unique().tolist():
                deq[p, e] = gguf.quants.dequantize(np.asarray(t.data[e]), T(t.tensor_type)).astype(np.float32)
        xf = x.float().numpy()
        ref = np.zeros((q, H), np.float32)
        for i in range(q):
            for j in range(K):
                e = int(ids[i, j])
                g, u = deq["ffn_gate_exps", e] @ xf[i], deq["ffn_up_exps", e] @ xf[i]
                ref[i] += float(w[i, j]) * (deq["ffn_down_exps", e] @ (g / (1 + np.exp(-g)) * u))
        out["check_rel_err"] = float(np.linalg.norm(y.float().numpy() - ref) / np.linalg.norm(ref))

    bytes_per_expert = total_bytes / NL / E
    for qlen in qlens:
        pool = 61  # prime: routings and layers do not line up
        routes = [routing(qlen) for _ in range(pool)]
        xs = [torch.randn(qlen, H, generator=gen).to(torch.bfloat16) for _ in range(3)]
        y = torch.zeros(qlen, H, dtype=torch.bfloat16)
        for i in range(2 * NL):  # warm-up: every layer, pool and page faults
            forward(i % NL, qlen, *routes[i % pool], xs[i % 3], y)
        times: list[float] = []
        uniq: list[int] = []
        i = 0
        c0, w0 = sum(os.times()[:2]), time.perf_counter()
        stop = w0 + float(job["min_time_s"])
        while time.perf_counter() < stop or len(times) < 3 * NL:
            ids, w = routes[i % pool]
            t0 = time.perf_counter()
            forward(i % NL, qlen, ids, w, xs[i % 3], y)
            times.append(time.perf_counter() - t0)
            uniq.append(int(ids.unique().numel()))
            i += 1
        wall = time.perf_counter() - w0
        med = statistics.median(times)
        out["ms"][qlen] = med * 1e3
        out["mean_ms"][qlen] = statistics.mean(times) * 1e3
        out["n_calls"][qlen] = len(times)
        out["cpu_per_wall"][qlen] = (sum(os.times()[:2]) - c0) / wall
        out["eff_GBps"][qlen] = statistics.mean(uniq) * bytes_per_expert / med / 1e9
    print("KT_RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------------------------- CLI
def available_peers() -> dict[str, str]:
    """Cheap availability check: peer name -> '' if usable, else the reason it is not."""
    out = {}
    for b in LLAMA_BENCH_BUILDS:
        out[f"llama.cpp-{b}"] = "" if find_llama_bench(b) else f"llama-bench ({b}) not found"
    try:
        out["kt-kernel"] = "" if importlib.util.find_spec("kt_kernel") else "kt-kernel not installed"
    except (ImportError, ValueError) as e:
        out["kt-kernel"] = f"kt-kernel not importable: {e}"
    if not find_ggml_base_lib():
        out["ggml-quantizer"] = "libggml-base.so not found: K-quant GGUFs cannot be written"
    return out


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Measure the peers (llama.cpp, kt-kernel) on one Qwen3-MoE layer.")
    ap.add_argument("--types", default="Q4_K,Q8_0")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument(
        "--peers",
        default="llama.cpp-native,llama.cpp-noamx,kt-kernel",
        help="comma list of llama.cpp-native, llama.cpp-noamx, kt-kernel[-LLAMAFILE|-AMXINT8|-AMXINT4]"
        "[@amx|@avx512_bf16|...]",
    )
    ap.add_argument("--attention", default="tiny", choices=["tiny", "full"])
    ap.add_argument("--n-prompt", type=int, default=128)
    ap.add_argument("--n-gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-repack", action="store_true", help="llama-bench --repack 0")
    ap.add_argument("--min-time", type=float, default=2.0, help="kt-kernel: seconds of timed calls per qlen")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--json", default=None, help="also write all results to this file")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="before each measurement wait up to this many seconds for other processes to go idle, "
        "and repeat a disturbed measurement (up to --retries times)",
    )
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--kt-worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.kt_worker is not None:
        _kt_worker(json.loads(a.kt_worker))
        return 0

    args = list(argv) if argv is not None else sys.argv[1:]
    print("command: python " + " ".join([sys.argv[0]] + args))
    print(f"L3 {l3_bytes() / 2**20:.0f} MiB; cache {a.cache_dir or default_cache_dir()}")
    for k, why in available_peers().items():
        if why:
            print(f"  unavailable: {k}: {why}")
    rows: list[LayerTimes] = []
    skipped: list[str] = []
    for et in a.types.split(","):
        for th in (int(t) for t in a.threads.split(",")):
            for peer in a.peers.split(","):
                for attempt in range(1 + max(0, a.retries if a.quiet_wait > 0 else 0)):
                    if a.quiet_wait > 0 and not wait_for_quiet(a.quiet_wait):
                        print("  (machine still busy after --quiet-wait; measuring anyway)", flush=True)
                    r = _measure(peer, et, th, a)
                    disturbed = isinstance(r, dict) and r.get("details", {}).get("foreign_cores", 0.0)
                    if disturbed and disturbed > DISTURBED_CORES:
                        print(
                            f"  {peer} {et} t={th}: disturbed (others used "
                            f"{r['details']['foreign_cores']:.2f} cores), attempt {attempt + 1}",
                            flush=True,
                        )
                        continue
                    break
                if r is False:
                    skipped.append(f"{peer}: unknown peer")
                    continue
                if r is None:
                    skipped.append(f"{peer} {et} t={th}: {last_reason()}")
                    print(f"  skipped {peer} {et} t={th}: {last_reason()}", flush=True)
                else:
                    rows.append(r)
                    print(
                        f"  {r['peer']:<22} {et:<5} t={th} decode {_fmt(r.get('decode_ms'))} ms  prefill-"
                        f"{a.n_prompt} {_fmt(r.get('prefill_ms'))} ms  ({r['elapsed_s']:.0f}s)",
                        flush=True,
                    )
    _print_table(rows, skipped, a.n_prompt)
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=1, default=str))
    return 0


def _measure(peer: str, et: str, th: int, a: argparse.Namespace) -> LayerTimes | None | bool:
    """One CLI measurement; False for an unknown peer name."""
    if peer.startswith("llama.cpp-"):
        return llama_cpp_layer_ms(
            et,
            th,
            n_prompt=a.n_prompt,
            n_gen=a.n_gen,
            reps=a.reps,
            build=peer[len("llama.cpp-") :],
            repack=not a.no_repack,
            attention=a.attention,
            cache_dir=a.cache_dir,
        )
    if peer.startswith("kt-kernel"):  # kt-kernel[-METHOD][@cpu_variant]
        name, _, variant = peer.partition("@")
        method = name.split("-", 2)[2] if name.count("-") >= 2 else "LLAMAFILE"
        return kt_kernel_layer_ms(
            et,
            th,
            qlens=(1, a.n_prompt),
            method=method,
            min_time_s=a.min_time,
            cpu_variant=variant or None,
            cache_dir=a.cache_dir,
        )
    return False


def _print_table(rows: Sequence[LayerTimes], skipped: Sequence[str], n_prompt: int) -> None:
    print("\nOne Qwen3-30B-A3B MoE layer (H 2048, I 768, E 128, top-8), median ms per layer")
    print(f"| peer | experts | threads | cores used | decode (1 tok) | prefill ({n_prompt} tok) | took |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['peer']} | {r['expert_type']} | {r['threads']} | {_fmt(r.get('cores_used'))} | "
            f"{_fmt(r.get('decode_ms'))} | {_fmt(r.get('prefill_ms'))} | {r['elapsed_s']:.0f} s |"
        )
    print("\nnotes / commands:")
    for r in rows:
        print(f"- {r['peer']} {r['expert_type']} t={r['threads']}: {r['note']}\n    {r['command']}")
    for s in skipped:
        print(f"- skipped {s}")


if __name__ == "__main__":
    sys.exit(main())
