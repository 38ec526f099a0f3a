"""``ktinject validate RULES``: load and check a rule file without a model."""

from __future__ import annotations

from ktinject.cli.common import add_vars_option, parse_vars


def register(sub) -> None:
    p = sub.add_parser("validate", help="check a rule file (syntax, includes, ops, classes, devices, kwargs)")
    p.add_argument("rules", help="rule file path, built-in name (e.g. qwen3_moe) or YAML text")
    add_vars_option(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ktinject.rules import load_rules

    ruleset = load_rules(args.rules, vars=parse_vars(args.vars))
    print(ruleset)
    print(f"ok: {len(ruleset)} rules")
    return 0
