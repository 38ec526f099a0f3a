"""Seeded fuzzing of the GGUF reader: a few hundred damaged copies of a tiny valid GGUF through from_pretrained.

Each case mutates one thing of a valid file the test writes (a header count, a metadata key, type, length
or value, a tensor's name, dimensions, GGML type or data offset, or cuts the file short) and loads it with
``ktinject.from_pretrained(gguf=...)`` and torch rules. Every case must end in a ``KtInjectError`` (a
``WeightError`` must name the file) or load weights bit-identical to the undamaged file's (when the mutation
is harmless: a byte of a string nobody reads, a hyperparameter that shapes no tensor). Any other exception,
a crash, a hang or silently different weights fails the test.

The cases run in a child process (this file run as a script), so a crash or a hang is a failed test that
names the case, not a dead test run. The seed is fixed; ``KTINJECT_FUZZ_SEED`` and ``KTINJECT_FUZZ_CASES``
explore others (``python tests/weights/test_gguf_fuzz.py --seed 7 --cases 2000 --out /tmp/fuzz``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the child: the test helpers (gguf_bytes, gguf_writer, tiny_models) are one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gguf_bytes import HEADER, Layout, Part, get, header_part, put, read_layout  # noqa: E402

SEED = int(os.environ.get("KTINJECT_FUZZ_SEED", "20240611"))
CASES = int(os.environ.get("KTINJECT_FUZZ_CASES", "360"))
CASE_SECONDS = 20  # one load of the tiny model takes ~0.05 s; anything near this is a hang


# -- the parent: run the child, judge its report ------------------------------------------------------
def test_damaged_gguf_files_fail_cleanly_or_load_the_same_weights(tmp_path):
    report = tmp_path / "report.json"
    progress = tmp_path / "progress.txt"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--seed",
        str(SEED),
        "--cases",
        str(CASES),
        "--out",
        str(tmp_path),
        "--report",
        str(report),
        "--progress",
        str(progress),
    ]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=CASES * 0.5 + 120,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    except subprocess.TimeoutExpired:
        last = progress.read_text().splitlines()[-1:] if progress.exists() else []
        raise AssertionError(f"the fuzz run hung; last case started: {last}") from None
    if done.returncode != 0:
        last = progress.read_text().splitlines()[-1:] if progress.exists() else []
        raise AssertionError(
            f"the fuzz child died (exit {done.returncode}); last case started: {last}\n{done.stderr[-3000:]}"
        )
    results = json.loads(report.read_text())
    bad = [r for r in results if r["outcome"] not in ("error", "same")]
    assert not bad, f"{len(bad)} of {len(results)} damaged files were not handled:\n" + "\n".join(
        f"  case {r['case']} [{r['kind']}] {r['mutation']}: {r['outcome']}: {r['detail'][-1500:]}" for r in bad[:15]
    )
    assert len(results) == CASES
    # The harness itself works: every kind of damage was tried, most are caught, some are harmless.
    kinds = {r["kind"] for r in results}
    assert kinds == set(KINDS), f"mutation kinds never drawn: {set(KINDS) - kinds}"
    errors = sum(r["outcome"] == "error" for r in results)
    assert CASES * 0.5 < errors < CASES, f"{errors} of {CASES} cases were errors"


# -- the base file --------------------------------------------------------------------------------------
def _types(name: str, shape: tuple[int, ...]) -> str:
    # Q8_0 matrices and F32 vectors: no other GGML type has the same bytes per row (F16/BF16, Q4_0/IQ4_NL
    # would), so a changed type is always visible in the sizes; swapping equal-sized types cannot be detected.
    return "f32" if len(shape) <= 1 else "q8_0"


def write_base(path: Path) -> None:
    """A 2-layer Qwen3-MoE GGUF with every row a multiple of 32, a tokenizer token list and a name."""
    from unittest import mock

    import gguf_writer
    from tiny_models import tiny_model

    model = tiny_model("qwen3_moe", num_hidden_layers=2, mlp_only_layers=[], moe_intermediate_size=32, num_experts=4)
    plain = gguf_writer.write_metadata

    def with_tokenizer(writer, config) -> None:
        plain(writer, config)
        writer.add_name("tiny fuzz base")
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"tok{i}" for i in range(config.vocab_size)])
        writer.add_array("tokenizer.ggml.token_type", [1] * config.vocab_size)

    with mock.patch.object(gguf_writer, "write_metadata", with_tokenizer):
        gguf_writer.write_gguf(model, path, types=_types)


# -- mutations ----------------------------------------------------------------------------------------------
def _integer_choices(rng: random.Random, old: int) -> int:
    return rng.choice(
        [
            0,
            1,
            old + 1,
            old - 1,
            old * 2,
            old // 2,
            old + rng.randint(2, 64),
            2**31,
            2**32 - 1,
            2**40,
            2**63,
            2**64 - 1,
            rng.getrandbits(64),
        ]
    )


def _number_choices(rng: random.Random, old: float) -> float:
    return rng.choice([float("nan"), float("inf"), -float("inf"), 0.0, -1.0, -old, old * 2, 1e30, 1e-30, 0.5])


def _header(rng, data: bytearray, layout: Layout) -> str:
    name = rng.choice(list(HEADER))
    part = header_part(name)
    old = get(data, part)
    new = rng.choice([old - 1, old + 1, old - 1, old + 1, _integer_choices(rng, old)])
    put(data, part, new)
    return f"{name} {old} -> {new % 2 ** (8 * part.size)}"


def _kv_type(rng, data: bytearray, layout: Layout) -> str:
    key, parts = rng.choice(layout.kvs)
    old = get(data, parts[2])
    new = rng.choice([*range(13), 13, 99, 2**32 - 1])
    put(data, parts[2], new)
    return f"{key}: value type {old} -> {new}"


def _kv_key(rng, data: bytearray, layout: Layout) -> str:
    key, parts = rng.choice(layout.kvs)
    if rng.random() < 0.4:
        old = get(data, parts[0])
        new = rng.choice([old - 1, old + 1, 0, 2**32, 2**64 - 1])
        put(data, parts[0], new)
        return f"{key}: key length {old} -> {new % 2**64}"
    at = parts[1].offset + rng.randrange(parts[1].size)
    new = rng.choice([0xFF, 0x80, ord("x"), ord("."), rng.randrange(256)])
    data[at] = new
    return f"{key}: key byte {at - parts[1].offset} -> {new:#x}"


def _kv_value(rng, data: bytearray, layout: Layout) -> str:
    key, parts = rng.choice(layout.kvs)
    value = parts[3:]
    value_type = get(data, parts[2])
    if value_type == 8:  # string: [length, bytes]
        if rng.random() < 0.5 or value[1].size == 0:
            old = get(data, value[0])
            new = rng.choice([old - 1, old + 1, 0, old + 1000, 2**64 - 1])
            put(data, value[0], new)
            return f"{key}: string length {old} -> {new % 2**64}"
        at = value[1].offset + rng.randrange(value[1].size)
        data[at] = rng.choice([0xFF, 0xC3, 0x00, rng.randrange(256)])
        return f"{key}: string byte {at - value[1].offset} -> {data[at]:#x}"
    if value_type == 9:  # array: [item type, length, items...]
        choice = rng.random()
        if choice < 0.35:
            old = get(data, value[1])
            new = rng.choice([old - 1, old + 1, 0, old * 2, 2**40, 2**64 - 1])
            put(data, value[1], new)
            return f"{key}: array length {old} -> {new % 2**64}"
        if choice < 0.6:
            old = get(data, value[0])
            new = rng.choice([*range(13), 99])
            put(data, value[0], new)
            return f"{key}: array item type {old} -> {new}"
        item = rng.choice(value[2:])
        at = item.offset + rng.randrange(item.size)
        data[at] = rng.choice([0xFF, 0x00, rng.randrange(256)])
        return f"{key}: array item byte at {at} -> {data[at]:#x}"
    part = value[0]
    old = get(data, part)
    if part.dtype.startswith("float"):
        new = _number_choices(rng, old)
    elif part.dtype == "bool":
        new = rng.choice([0, 1, 2, 255])
    else:
        new = rng.choice([old - 1, old + 1, _integer_choices(rng, old), _integer_choices(rng, old)])
    put(data, part, new)
    return f"{key}: {old} -> {new}"


def _tensor_type(rng, data: bytearray, layout: Layout) -> str:
    import gguf

    name, parts = rng.choice(layout.tensors)
    old = get(data, parts[4])
    new = rng.choice([*(int(t) for t in gguf.GGMLQuantizationType), 4, 5, 31, 99, 2**32 - 1])
    put(data, parts[4], new)
    return f"{name}: GGML type {old} -> {new}"


def _tensor_dims(rng, data: bytearray, layout: Layout) -> str:
    name, parts = rng.choice(layout.tensors)
    n_dims, dims = parts[2], parts[3]
    count = dims.size // 8
    if rng.random() < 0.2:
        old = get(data, n_dims)
        new = rng.choice([0, old - 1, old + 1, 5, 2**32 - 1])
        put(data, n_dims, new)
        return f"{name}: n_dims {old} -> {new % 2**32}"
    if count >= 2 and rng.random() < 0.2:
        i, j = rng.sample(range(count), 2)
        a, b = (Part(dims.offset + 8 * k, 8, "uint64") for k in (i, j))
        va, vb = get(data, a), get(data, b)
        put(data, a, vb)
        put(data, b, va)
        return f"{name}: dims {i} and {j} swapped ({va}, {vb})"
    k = rng.randrange(count)
    part = Part(dims.offset + 8 * k, 8, "uint64")
    old = get(data, part)
    new = rng.choice([old + 1, old - 1, old * 2, old // 2, old + 32, 0, 1, 2**32, 2**40, 2**63, 2**64 - 1])
    put(data, part, new)
    return f"{name}: dim {k} {old} -> {new % 2**64}"


def _tensor_offset(rng, data: bytearray, layout: Layout) -> str:
    index = rng.randrange(len(layout.tensors))
    name, parts = layout.tensors[index]
    old = get(data, parts[5])
    other = get(data, rng.choice(layout.tensors)[1][5])
    new = rng.choice([old + 1, old - 1, old + 32, old - 32, old + 64, other, 0, old * 2, 2**40, 2**64 - 32])
    put(data, parts[5], new)
    return f"{name}: data offset {old} -> {new % 2**64}"


def _tensor_name(rng, data: bytearray, layout: Layout) -> str:
    name, parts = rng.choice(layout.tensors)
    choice = rng.random()
    if choice < 0.25:
        old = get(data, parts[0])
        new = rng.choice([old - 1, old + 1, 0, 64, 2**32, 2**64 - 1])
        put(data, parts[0], new)
        return f"{name}: name length {old} -> {new % 2**64}"
    if choice < 0.6 and name.startswith("blk."):
        digit = parts[1].offset + 4
        new = rng.choice("0123456789")
        data[digit] = ord(new)
        return f"{name}: block number -> {new}"
    if choice < 0.8:
        same = [n for n, p in layout.tensors if n != name and len(n) == len(name)]
        if same:
            other = rng.choice(same)
            data[parts[1].offset : parts[1].offset + parts[1].size] = other.encode()
            return f"{name}: renamed to {other}"
    at = parts[1].offset + rng.randrange(parts[1].size)
    data[at] = rng.choice([0xFF, 0x00, ord("_"), rng.randrange(256)])
    return f"{name}: name byte {at - parts[1].offset} -> {data[at]:#x}"


def _truncate(rng, data: bytearray, layout: Layout) -> str:
    cut = rng.randrange(24, layout.data_start) if rng.random() < 0.6 else rng.randrange(layout.data_start, layout.size)
    del data[cut:]
    return f"cut at byte {cut} of {layout.size}"


def _scribble(rng, data: bytearray, layout: Layout) -> str:
    spots = sorted(rng.randrange(24, layout.data_start) for _ in range(rng.randint(1, 4)))
    for at in spots:
        data[at] = rng.randrange(256)
    return "header bytes " + ", ".join(f"{at}={data[at]:#x}" for at in spots)


KINDS = {
    "header": (_header, 3),
    "kv_type": (_kv_type, 3),
    "kv_key": (_kv_key, 3),
    "kv_value": (_kv_value, 8),
    "tensor_type": (_tensor_type, 5),
    "tensor_dims": (_tensor_dims, 5),
    "tensor_offset": (_tensor_offset, 5),
    "tensor_name": (_tensor_name, 4),
    "truncate": (_truncate, 3),
    "scribble": (_scribble, 3),
}


# -- the child: run the cases -----------------------------------------------------------------------------
def _load(path: Path):
    import torch
    from gguf_writer import torch_rules

    import ktinject

    model = ktinject.from_pretrained(gguf=path, rules=torch_rules(), dtype=torch.float32, progress=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _compare(state, baseline) -> str | None:
    import torch

    if state.keys() != baseline.keys():
        return f"tensors differ: extra {sorted(state.keys() - baseline.keys())[:3]}, missing {sorted(baseline.keys() - state.keys())[:3]}"
    for name, tensor in state.items():
        expected = baseline[name]
        if tensor.dtype != expected.dtype or tensor.shape != expected.shape or not torch.equal(tensor, expected):
            return f"{name} differs ({tensor.dtype} {tuple(tensor.shape)})"
    return None


class _Hang(Exception):
    pass


def run_cases(seed: int, cases: int, out: Path, progress: Path) -> list[dict]:
    import logging
    import signal
    import traceback

    import torch

    from ktinject import KtInjectError, WeightError

    torch.set_num_threads(1)
    logging.getLogger("ktinject").setLevel(logging.ERROR)  # tied-output warnings of harmless cases
    base = out / "base.gguf"
    write_base(base)
    original = base.read_bytes()
    layout = read_layout(base)
    baseline = _load(base)

    def alarm(signum, frame):
        raise _Hang(f"still running after {CASE_SECONDS} s")

    signal.signal(signal.SIGALRM, alarm)
    rng = random.Random(seed)
    names = list(KINDS)
    weights = [KINDS[k][1] for k in names]
    results = []
    path = out / "damaged.gguf"
    with open(progress, "w") as log:
        for case in range(cases):
            kind = names[case] if case < len(names) else rng.choices(names, weights)[0]
            data = bytearray(original)
            mutation = KINDS[kind][0](rng, data, layout)
            path.write_bytes(bytes(data))
            log.write(f"case {case} [{kind}] {mutation}\n")
            log.flush()
            outcome, detail = "same", ""
            signal.alarm(CASE_SECONDS)
            try:
                state = _load(path)
                signal.alarm(0)
                if bytes(data) == original:
                    pass
                elif (difference := _compare(state, baseline)) is not None:
                    outcome, detail = "silently different weights", difference
            except _Hang as exc:
                outcome, detail = "hang", str(exc)
            except KtInjectError as exc:
                signal.alarm(0)
                outcome, detail = "error", str(exc)
                if isinstance(exc, WeightError) and path.name not in detail:
                    outcome = "WeightError not naming the file"
            except Exception as exc:  # what the test exists to catch
                signal.alarm(0)
                outcome, detail = f"{type(exc).__name__}", traceback.format_exc()
            results.append({"case": case, "kind": kind, "mutation": mutation, "outcome": outcome, "detail": detail})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--cases", type=int, default=CASES)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--report", type=Path)
    parser.add_argument("--progress", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run_cases(args.seed, args.cases, args.out, args.progress or args.out / "progress.txt")
    (args.report or args.out / "report.json").write_text(json.dumps(results, indent=1))
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    print(f"{len(results)} cases in {time.perf_counter() - start:.1f} s: {counts}")


if __name__ == "__main__":
    main()
