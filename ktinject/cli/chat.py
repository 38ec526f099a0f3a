"""``ktinject chat --model DIR``: talk to the optimized model in the terminal, the answer streaming as it is made.

The model runs on the serving engine's thread, so Ctrl-C only cancels the answer being written (the engine
drops it before its next token) and the conversation goes on. ``/reset`` forgets the history, ``/exit``
(or Ctrl-D) quits.
"""

from __future__ import annotations

import queue
import sys

from ktinject.cli.model_options import (
    add_model_options,
    add_sampling_options,
    check_model_args,
    load_model,
    load_tokenizer,
    model_vars,
    require_chat_template,
    sampling_values,
)

HELP = "type a message; /reset forgets the conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer"


def register(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat in the terminal with an optimized model (streams the answer)")
    add_model_options(p)
    p.add_argument("--system", default=None, help="a system message to start every conversation with")
    p.add_argument("--max-new-tokens", type=int, default=None, help="longest answer (default: until the model stops)")
    add_sampling_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ktinject.errors import KtInjectError
    from ktinject.serving import Engine

    check_model_args(args)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise KtInjectError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    sampling = sampling_values(args)
    vars = model_vars(args)
    tokenizer = load_tokenizer(args.model, args.gguf)
    require_chat_template(tokenizer, args.model or args.gguf)

    engine = Engine(lambda: load_model(args, vars=vars), tokenizer, max_batch_size=1).start()
    print("loading the model ...", flush=True)
    if not engine.wait_until_loaded():
        raise engine.load_error
    params = engine.params(max_tokens=args.max_new_tokens, **sampling)
    print(f"ready ({engine.load_seconds:.1f} s). {HELP}")
    try:
        _conversation(engine, tokenizer, params, args.system)
    finally:
        engine.stop()
    return 0


def _conversation(engine, tokenizer, params, system: str | None) -> None:
    from ktinject.serving import RequestError

    history: list[dict] = []
    while True:
        try:
            line = input("\n> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # like a shell: drop the line being typed
            print("\n(" + HELP + ")")
            continue
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history.clear()
            print("(conversation reset)")
            continue
        if not text:
            continue
        messages = (
            ([{"role": "system", "content": system}] if system else []) + history + [{"role": "user", "content": text}]
        )
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        try:
            answer = _answer(engine, ids, params)
        except RequestError as exc:
            print(f"error: {exc}" + (" (/reset starts a new conversation)" if history else ""), file=sys.stderr)
            continue
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


def _answer(engine, ids: list[int], params) -> str:
    """Stream one answer to the terminal; Ctrl-C cancels it and keeps what was written."""
    outputs: queue.Queue = queue.Queue()
    request = engine.submit(ids, params, outputs.put)
    parts: list[str] = []
    try:
        while True:
            try:
                output = outputs.get(timeout=0.1)
            except queue.Empty:
                continue
            print(output.text, end="", flush=True)
            parts.append(output.text)
            if output.error is not None:
                print(f"\nerror: {output.error}", file=sys.stderr)
                break
            if output.final:
                break
    except KeyboardInterrupt:
        request.cancel()
        print(" [stopped]", end="")
    print()
    return "".join(parts)
