"""``ktinject generate --model DIR [--gguf FILE] --prompt TEXT``: load with rules, generate, report speeds."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

from ktinject.cli.common import add_vars_option, parse_vars
from ktinject.errors import KtInjectError


def register(sub) -> None:
    p = sub.add_parser("generate", help="load a model with rules (safetensors or GGUF) and generate text")
    p.add_argument("--model", help="model directory (config.json, tokenizer, safetensors); optional with --gguf")
    p.add_argument("--gguf", help="GGUF file (any file of a split set); weights come from it")
    p.add_argument("--rules", default="auto", help="rule file, built-in name, or 'auto' (by model_type; default)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", default=None, help="model dtype: bfloat16, float16, float32 (default: the config's)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt with the tokenizer's chat template")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while loading")
    add_vars_option(p)
    p.set_defaults(run=run)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def load_tokenizer(model_dir: str | None, gguf: str | None):
    """The directory's tokenizer, else the one transformers rebuilds from the GGUF metadata."""
    from transformers import AutoTokenizer

    errors = []
    if model_dir is not None:
        try:
            return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            errors.append(f"{model_dir}: {exc}")
    if gguf is not None:
        path = Path(gguf)
        if not path.is_file() and model_dir is not None:
            path = Path(model_dir) / gguf
        try:
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        except Exception as exc:  # transformers raises many kinds for GGUFs without a usable tokenizer
            errors.append(f"{path}: {type(exc).__name__}: {exc}")
    raise KtInjectError("no tokenizer found (" + "; ".join(errors or ["give --model DIR with tokenizer files"]) + ")")


class _Timer:
    """A generate() streamer that records when the prompt was taken and when each new token came out."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run(args) -> int:
    import torch

    import ktinject

    if args.model is None and args.gguf is None:
        raise KtInjectError("give --model DIR, --gguf FILE, or both")
    start = time.perf_counter()
    model = ktinject.from_pretrained(args.model, gguf=args.gguf, rules=args.rules, vars=parse_vars(args.vars),
                                     dtype=args.dtype, progress=not args.no_progress)
    load_s = time.perf_counter() - start
    print(f"loaded in {load_s:.1f} s, peak RSS {peak_rss_bytes() / 2**30:.2f} GiB")

    tokenizer = load_tokenizer(args.model, args.gguf)
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    device = model.get_input_embeddings().weight.device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    prompt_len = inputs["input_ids"].shape[1]

    timer = _Timer()
    begin = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=timer)
    end = time.perf_counter()
    new = out[0, prompt_len:]
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    token_times = timer.times[1:]  # the first put() is the prompt itself
    if token_times:
        prefill = token_times[0] - begin
        decode_n = len(token_times) - 1
        decode = end - token_times[0]
        print(f"prefill: {prompt_len} tokens in {prefill:.2f} s ({prompt_len / prefill:.1f} tokens/s)")
        if decode_n > 0:
            print(f"decode:  {decode_n} tokens in {decode:.2f} s ({decode_n / decode:.1f} tokens/s)")
    print(f"{len(new)} new tokens; load {load_s:.1f} s, peak RSS {peak_rss_bytes() / 2**30:.2f} GiB")
    return 0
