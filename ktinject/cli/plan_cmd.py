"""``ktinject plan --config C --rules R``: the dry run on a model built on the meta device."""

from __future__ import annotations

import time

from ktinject.cli.common import add_vars_option, load_config, meta_model, parse_vars


def register(sub) -> None:
    p = sub.add_parser("plan", help="show which rule claims which module of a model (no weights needed)")
    p.add_argument("--config", required=True, help="model directory or config.json")
    p.add_argument("--rules", default="auto", help="rule file, built-in name, or 'auto' (by model_type; default)")
    p.add_argument("--full", action="store_true", help="one row per module instead of grouping layers")
    add_vars_option(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ktinject.injection import plan_for
    from ktinject.planning import format_plan

    start = time.perf_counter()
    config = load_config(args.config)
    model = meta_model(config)
    p = plan_for(model, args.rules, vars=parse_vars(args.vars))
    if args.full:
        for e in p:
            print(f"{e.module_name or '<root>'}\t{e.module_class}\t{e.rule.label}\t{e.op}\t{e.device}")
    else:
        print(format_plan(p))
    print(f"model_type {config.model_type}, {len(p.rules.files)} rule files, planned in {time.perf_counter() - start:.1f} s")
    return 0
