"""What ``generate``, ``chat`` and ``serve`` share: which model to load and how, its tokenizer, and sampling flags.

Everything a user can get wrong without the weights (tokenizer files, chat template, prompt, flag values) is
checked before the model loads: loading a big model takes minutes and an error after it is wasted time.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ktinject.cli.common import add_vars_option, parse_vars
from ktinject.errors import KtInjectError

# Files any transformers tokenizer is built from; a directory with none of them gives an empty tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "vocab.txt",
    "tokenizer.tiktoken",
)


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory (config.json, tokenizer, safetensors); optional with --gguf")
    p.add_argument("--gguf", help="GGUF file (any file of a split set); weights come from it")
    p.add_argument("--rules", default="auto", help="rule file, built-in name, or 'auto' (by model_type; default)")
    p.add_argument("--dtype", default=None, help="model dtype: bfloat16, float16, float32 (default: the config's)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="worker threads of the CPU experts (same as --set cpu_threads=N; 0 = all CPUs)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar while loading")
    add_vars_option(p)


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 (default) is greedy decoding"
    )
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the most likely tokens covering P")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (reproducible output)")


def model_vars(args) -> dict[str, Any]:
    """``--set`` values plus ``--threads`` (as ``cpu_threads``); a conflicting pair is an error."""
    values = parse_vars(args.vars)
    if args.threads is not None:
        if args.threads < 0:
            raise KtInjectError(f"--threads must be 0 (all CPUs) or positive, got {args.threads}")
        if "cpu_threads" in values and values["cpu_threads"] != args.threads:
            raise KtInjectError(f"--threads {args.threads} conflicts with --set cpu_threads={values['cpu_threads']}")
        values["cpu_threads"] = args.threads
    return values


def check_model_args(args) -> None:
    if args.model is None and args.gguf is None:
        raise KtInjectError("give --model DIR, --gguf FILE, or both")
    if args.model is not None and not Path(args.model).exists():
        raise KtInjectError(f"--model {args.model}: no such directory or file")


def sampling_values(args) -> dict[str, Any]:
    """The sampling flags as ``SamplingParams`` fields; flags that only apply when sampling need a temperature."""
    if args.temperature < 0:
        raise KtInjectError(f"--temperature must be 0 (greedy) or positive, got {args.temperature}")
    if args.temperature == 0:
        given = [
            flag
            for flag, value in (("--top-p", args.top_p), ("--top-k", args.top_k), ("--seed", args.seed))
            if value is not None
        ]
        if given:
            verb = "apply" if len(given) > 1 else "applies"
            raise KtInjectError(
                f"{', '.join(given)} {verb} only when sampling: add --temperature T (> 0); greedy is the default"
            )
        return {"temperature": 0.0}
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise KtInjectError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 0:
        raise KtInjectError(f"--top-k must be 0 (off) or positive, got {args.top_k}")
    out = {"temperature": args.temperature, "seed": args.seed}
    if args.top_p is not None:
        out["top_p"] = args.top_p
    if args.top_k is not None:
        out["top_k"] = args.top_k
    return out


def load_tokenizer(model_dir: str | None, gguf: str | None):
    """The directory's tokenizer, else the one transformers rebuilds from the GGUF metadata; never an empty one."""
    from transformers import AutoTokenizer

    errors = []
    if model_dir is not None:
        directory = Path(model_dir)
        directory = directory if directory.is_dir() else directory.parent
        if not any((directory / name).is_file() for name in TOKENIZER_FILES):
            errors.append(f"{directory} has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
        else:
            try:
                return _non_empty(AutoTokenizer.from_pretrained(directory, local_files_only=True), str(directory))
            except KtInjectError as exc:
                errors.append(str(exc))
            except Exception as exc:  # transformers raises many kinds for unusable tokenizer files
                errors.append(f"{directory}: {type(exc).__name__}: {_first_line(exc)}")
    if gguf is not None:
        path = Path(gguf)
        if not path.is_file() and model_dir is not None:
            path = Path(model_dir) / gguf
        try:
            return _non_empty(
                AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True), str(path)
            )
        except KtInjectError as exc:
            errors.append(str(exc))
        except Exception as exc:  # transformers raises many kinds for GGUFs without a usable tokenizer
            errors.append(f"{path}: {type(exc).__name__}: {_first_line(exc)}")
    raise KtInjectError("no tokenizer found (" + "; ".join(errors or ["give --model DIR with tokenizer files"]) + ")")


def _non_empty(tokenizer, where: str):
    if len(tokenizer) < 2:
        raise KtInjectError(f"{where}: the tokenizer is empty ({len(tokenizer)} tokens)")
    return tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def require_chat_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise KtInjectError(f"the tokenizer of {where} has no chat template (run without --chat, or use a chat model)")


def encode_prompt(tokenizer, prompt: str, *, chat: bool) -> list[int]:
    """Token ids of ``prompt`` (wrapped in the chat template with ``chat``); an empty result is an error."""
    if not prompt:
        raise KtInjectError("--prompt is empty: give the text to continue")
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise KtInjectError(f"the prompt {prompt[:40]!r} encodes to 0 tokens with this tokenizer")
    return list(ids)


def load_model(args, *, vars: dict[str, Any] | None = None):
    """``ktinject.from_pretrained`` with the command's options."""
    import ktinject

    return ktinject.from_pretrained(
        args.model,
        gguf=args.gguf,
        rules=args.rules,
        vars=model_vars(args) if vars is None else vars,
        dtype=args.dtype,
        progress=not args.no_progress,
    )


def model_name(args) -> str:
    """The name a server lists the model under: the model directory's name, else the GGUF file's stem."""
    if args.model is not None:
        return Path(args.model).resolve().name
    return Path(args.gguf).stem
