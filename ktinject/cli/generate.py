"""``ktinject generate --model DIR [--gguf FILE] --prompt TEXT``: load with rules, generate, report speeds.

Runs the model's own ``generate()`` (greedy unless ``--temperature``), the path every transformers user has.
"""

from __future__ import annotations

import resource
import sys
import time

from ktinject.cli.model_options import (
    add_model_options,
    add_sampling_options,
    check_model_args,
    encode_prompt,
    load_model,
    load_tokenizer,
    model_vars,
    require_chat_template,
    sampling_values,
)
from ktinject.errors import KtInjectError


def register(sub) -> None:
    p = sub.add_parser("generate", help="load a model with rules (safetensors or GGUF) and generate text")
    add_model_options(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chat", action="store_true", help="wrap the prompt with the tokenizer's chat template")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the decoding step (static KV cache + torch.compile) in a warm-up call before generating: "
        "much less Python per token on the CPU, at a one-off compile cost",
    )
    add_sampling_options(p)
    p.set_defaults(run=run)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class _Timer:
    """A generate() streamer that records when the prompt was taken and when each new token came out;
    with ``tokenizer`` it also prints the text as it grows."""

    def __init__(self, tokenizer=None, prompt_ids: list[int] | None = None) -> None:
        self.times: list[float] = []
        self._printer = None
        if tokenizer is not None:
            from ktinject.serving.text import TextStream

            self._printer = TextStream(tokenizer, prompt_ids or [])

    def put(self, value) -> None:
        self.times.append(time.perf_counter())
        if self._printer is not None and len(self.times) > 1:  # the first put() is the prompt itself
            for token in value.reshape(-1).tolist():
                print(self._printer.push(int(token)), end="", flush=True)

    def end(self) -> None:
        if self._printer is not None:
            print(self._printer.flush(), flush=True)


class _StopAfter:
    """A stopping criterion: stop once sequences are ``length`` tokens long (generate() takes any callable)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def run(args) -> int:
    import torch

    check_model_args(args)
    if args.max_new_tokens < 1:
        raise KtInjectError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    sampling = sampling_values(args)
    vars = model_vars(args)
    tokenizer = load_tokenizer(args.model, args.gguf)
    if args.chat:
        require_chat_template(tokenizer, args.model or args.gguf)
    prompt_ids = encode_prompt(tokenizer, args.prompt, chat=args.chat)

    start = time.perf_counter()
    model = load_model(args, vars=vars)
    load_s = time.perf_counter() - start
    print(f"loaded in {load_s:.1f} s, peak RSS {peak_rss_bytes() / 2**30:.2f} GiB")

    device = model.get_input_embeddings().weight.device
    input_ids = torch.tensor([prompt_ids], device=device)
    prompt_len = input_ids.shape[1]
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    if sampling["temperature"] > 0:
        from ktinject.serving.sampling import model_sampling_defaults

        defaults = model_sampling_defaults(model.generation_config)
        gen.update(
            do_sample=True,
            temperature=sampling["temperature"],
            top_p=sampling.get("top_p", defaults.get("top_p", 1.0)),
            top_k=sampling.get("top_k", defaults.get("top_k", 0)),
        )
        if sampling["seed"] is not None:
            torch.manual_seed(sampling["seed"])

    if args.compile:
        import ktinject

        ktinject.compile_decoding(model)
        warm = time.perf_counter()
        with torch.no_grad():  # the same cache size as the real call (no recompilation), stopped after 2 tokens
            model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                stopping_criteria=[_StopAfter(prompt_len + 2)],
                **gen,
            )
        print(f"compiled the decoding step in {time.perf_counter() - warm:.1f} s")
    if args.stream:
        print(tokenizer.decode(prompt_ids, skip_special_tokens=True), end="", flush=True)
    timer = _Timer(tokenizer, prompt_ids) if args.stream else _Timer()
    begin = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=timer, **gen)
    end = time.perf_counter()
    new = out[0, prompt_len:]
    if not args.stream:
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
