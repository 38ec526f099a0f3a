#!/usr/bin/env python3
"""Tokens/s of ``ktinject serve`` for 1, 2, 4, 8 concurrent streams, and its time to first token.

    python benchmarks/bench_serve.py --model /models/Qwen3-30B-A3B --gguf Qwen3-30B-A3B-Q4_K_M.gguf
    python benchmarks/bench_serve.py --url http://127.0.0.1:8000/v1          # a server already running
    python benchmarks/bench_serve.py --tiny                                   # a tiny random model (smoke run)
    python benchmarks/bench_serve.py --model DIR --compare-generate           # + TTFT against model.generate()

Method
- The server is started here (``python -m ktinject serve ... --port 0``) unless ``--url`` is given, and
  stopped at the end. Every stream is a streamed ``/v1/completions`` request with the same
  ``--prompt-tokens`` random token ids (seeded), greedy, ``max_tokens = --tokens`` and ``ignore_eos``, so
  every stream makes exactly that many tokens.
- For each concurrency C, C client threads start together; "tok/s total" = C x tokens / wall time from the
  first request sent to the last stream done; "tok/s per stream" = each stream's tokens after its first /
  time after its first token (median); TTFT is the median time from sending to the first token. One warm-up
  request runs first.
- TTFT of a 1-token prompt (``max_tokens`` 1) is the median of ``--ttft-repeats`` requests. With
  ``--compare-generate`` a second copy of the model is loaded in this process (it must fit twice) and
  ``model.generate(1 token, max_new_tokens=1)`` is timed alternately with the requests, so both see the
  same load: the ratio is server / bare call (the server's includes HTTP, tokenizing and the queue).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "ktinject",
        "serve",
        *(["--model", args.model] if args.model else []),
        "--port",
        "0",
        "--no-progress",
        "--max-batch-size",
        str(max(args.concurrency)),
    ]
    if args.gguf:
        cmd += ["--gguf", args.gguf]
    cmd += ["--rules", args.rules]
    for item in args.set:
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    url = None
    deadline = time.monotonic() + args.load_timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"the server exited (code {proc.wait()}) before it was ready")
        match = re.search(r"at (http://\S+/v1)", line)
        if match:
            url = match.group(1)
        if "ready (loaded" in line and url:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep the pipe drained
            return proc, url
    proc.terminate()
    raise SystemExit(f"the server was not ready after {args.load_timeout} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(2)  # SIGINT: uvicorn's graceful stop
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def model_id(client, url: str) -> str:
    response = client.get(f"{url}/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def stream_once(client, url: str, model: str, prompt: list[int], tokens: int) -> dict:
    """One streamed completion: send time, token arrival times."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    sent = time.perf_counter()
    times: list[float] = []
    with client.stream("POST", f"{url}/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"request failed: {response.status_code} {response.read().decode()}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise SystemExit(f"generation failed: {chunk['error']['message']}")
            if chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    return {"sent": sent, "times": times, "done": time.perf_counter()}


def run_concurrency(url: str, model: str, prompt: list[int], tokens: int, streams: int) -> dict:
    import httpx

    results: list[dict] = [None] * streams
    barrier = threading.Barrier(streams)

    def worker(i: int) -> None:
        with httpx.Client(timeout=None) as client:
            barrier.wait()
            results[i] = stream_once(client, url, model, prompt, tokens)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = min(r["sent"] for r in results)
    end = max(r["done"] for r in results)
    produced = sum(len(r["times"]) for r in results)
    per_stream = [(len(r["times"]) - 1) / (r["times"][-1] - r["times"][0]) for r in results if len(r["times"]) > 1]
    ttft = [r["times"][0] - r["sent"] for r in results if r["times"]]
    return {
        "streams": streams,
        "tokens": produced,
        "total_tps": produced / (end - start),
        "stream_tps": statistics.median(per_stream) if per_stream else float("nan"),
        "ttft_ms": 1000 * statistics.median(ttft),
    }


def ttft(url: str, model: str, token: int, repeats: int, bare=None) -> tuple[float, float | None]:
    """Median TTFT of a 1-token prompt through the server, and (with ``bare``) of the bare generate() call,
    the two measured alternately so both see the same machine load."""
    import httpx

    served, direct = [], []
    with httpx.Client(timeout=None) as client:
        for _ in range(repeats):
            r = stream_once(client, url, model, [token], 1)
            served.append(r["times"][0] - r["sent"])
            if bare is not None:
                direct.append(bare())
    return statistics.median(served), statistics.median(direct) if direct else None


def bare_generate(args, token: int):
    """A function timing ``model.generate(1 token, max_new_tokens=1)`` on a copy of the model loaded here."""
    import torch

    import ktinject
    from ktinject.cli.common import parse_vars

    model = ktinject.from_pretrained(
        args.model, gguf=args.gguf, rules=args.rules, vars=parse_vars(args.set), progress=False
    )
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([[token]], device=device)

    def once() -> float:
        with torch.inference_mode():
            begin = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
            return time.perf_counter() - begin

    once()  # warm-up
    return once


def tiny_model_dir() -> str:
    """A tiny random Qwen3-MoE with a character tokenizer (the demo's), written to a temporary directory
    (removed when the benchmark ends)."""
    from ktinject.demo_model import demo_model, demo_tokenizer

    path = tempfile.mkdtemp(prefix="ktinject-bench-serve-")
    tokenizer = demo_tokenizer()
    model = demo_model(tokenizer, steps=0)
    model.config.max_position_embeddings = 4096
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (the server is started here)")
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--rules", default="auto")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--url", help="an already running server's base URL (…/v1) instead of --model")
    parser.add_argument(
        "--tiny", action="store_true", help="benchmark a tiny random model (smoke run; built-in rules with gpu=cpu)"
    )
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--ttft-repeats", type=int, default=10)
    parser.add_argument("--compare-generate", action="store_true", help="also time model.generate() for the TTFT ratio")
    parser.add_argument("--load-timeout", type=float, default=3600)
    args = parser.parse_args()
    if args.tiny:
        args.model = tiny_model_dir()
        atexit.register(shutil.rmtree, args.model, ignore_errors=True)
        if args.rules == "auto" and not args.set:
            args.set = ["gpu=cpu"]  # the built-in rules, everything on the CPU
    if (args.model is None and args.gguf is None) == (args.url is None):
        parser.error("give --model DIR and/or --gguf FILE (or --tiny) to start a server, or --url of a running one")

    import httpx

    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args)
    try:
        with httpx.Client(timeout=None) as client:
            model = model_id(client, url)
        rng = random.Random(0)
        prompt = [rng.randrange(3, 60) for _ in range(args.prompt_tokens)]
        run_concurrency(url, model, prompt, 4, 1)  # warm-up
        rows = [run_concurrency(url, model, prompt, args.tokens, c) for c in args.concurrency]
        bare = bare_generate(args, prompt[0]) if args.compare_generate and args.model else None
        served, direct = ttft(url, model, prompt[0], args.ttft_repeats, bare)
    finally:
        if proc is not None:
            stop_server(proc)

    print(
        f"\nktinject serve, {args.tokens} tokens per stream, {args.prompt_tokens}-token prompt, greedy ({os.cpu_count()} CPUs)"
    )
    print(f"{'streams':>8} {'tok/s total':>12} {'tok/s per stream':>17} {'TTFT ms':>9}")
    for r in rows:
        print(f"{r['streams']:>8} {r['total_tps']:>12.1f} {r['stream_tps']:>17.1f} {r['ttft_ms']:>9.1f}")
    print(f"\nTTFT, 1-token prompt (median of {args.ttft_repeats}): server {1000 * served:.1f} ms")
    if direct is not None:
        print(
            f"model.generate(max_new_tokens=1) in this process: {1000 * direct:.1f} ms; "
            f"ratio server / generate = {served / direct:.2f}"
        )
    elif args.compare_generate:
        print("(--compare-generate needs --model: the bare call loads the model here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
