"""``ktinject demo``: optimize an embedded tiny MoE model with a built-in rule file and show it works."""

from __future__ import annotations

import copy
import sys
import time


def register(sub) -> None:
    p = sub.add_parser("demo", help="run an embedded tiny MoE model through ktinject (no downloads)")
    p.add_argument("--prompt", default="ktinject runs", help="text to continue (characters of the demo sentence)")
    p.add_argument("--max-new-tokens", type=int, default=54)
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    import ktinject
    from ktinject.demo_model import demo_model, demo_tokenizer
    from ktinject.devices import auto_device

    print("building the demo model (tiny Qwen3-MoE: 2 layers, 8 experts, top-2), training it on one sentence ...")
    start = time.perf_counter()
    tokenizer = demo_tokenizer()
    plain = demo_model(tokenizer, progress=_progress_line)
    print(f"  trained in {time.perf_counter() - start:.1f} s")

    optimized = copy.deepcopy(plain)
    gpu = auto_device()
    note = "" if gpu.type != "cpu" else "  (no GPU here: the rules' GPU placement, gpu=auto, is the CPU)"
    print(f"\noptimizing with the built-in rules 'qwen3_moe'{note}")
    plan = ktinject.optimize(optimized, "qwen3_moe")
    print(plan)
    replaced = [e for e in plan if not e.is_keep]
    print(f"\nreplaced {len(replaced)} modules:")
    for entry in replaced:
        new = optimized.get_submodule(entry.module_name)
        print(f"  {entry.module_name}: {entry.module_class} -> {type(new).__name__} on {entry.device}")

    inputs = tokenizer(args.prompt, return_tensors="pt")
    with torch.no_grad():
        expected = plain(**inputs).logits
        actual = optimized(**{k: v.to(optimized.device) for k, v in inputs.items()}).logits.to(expected.device)
    diff = (actual - expected).abs().max().item()
    print(f"\nlogits vs the plain model: max abs difference {diff:.2e} (logit scale {expected.abs().max().item():.1f})")

    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    text_plain = tokenizer.decode(plain.generate(**inputs, **gen)[0])
    start = time.perf_counter()
    out = optimized.generate(**{k: v.to(optimized.device) for k, v in inputs.items()}, **gen)
    elapsed = time.perf_counter() - start
    text_opt = tokenizer.decode(out[0])
    print(f"plain model.generate():     {text_plain!r}")
    print(
        f"optimized model.generate(): {text_opt!r}  ({out.shape[1] - inputs['input_ids'].shape[1]} tokens in {elapsed:.2f} s)"
    )
    same = text_plain == text_opt and diff < 1e-3
    print("\nOK: same tokens, logits match" if same else "\nMISMATCH between the plain and the optimized model")
    return 0 if same else 1


def _progress_line(step: int, steps: int, loss: float) -> None:
    """The training step and its loss: one line rewritten in place on a terminal, a line per quarter otherwise."""
    text = f"  training step {step}/{steps}, loss {loss:.3f}"
    if sys.stdout.isatty():
        print("\r" + text, end="\n" if step == steps else "", flush=True)
    elif step == steps or step % max(1, steps // 4) == 0:
        print(text, flush=True)
