"""``ktinject families``: every model type of the installed transformers with routed experts, and whether
``rules="auto"`` runs it (see ``ktinject.families.status``)."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser(
        "families", help="list the MoE model types of the installed transformers and whether ktinject runs them"
    )
    p.add_argument("model_types", nargs="*", metavar="MODEL_TYPE", help="only these model types (default: all)")
    p.add_argument(
        "--verify",
        action="store_true",
        help="also run each tiny random model optimized with rules=auto against plain transformers (seconds each)",
    )
    p.add_argument("--markdown", action="store_true", help="print a markdown table (the README's)")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch
    import transformers

    from ktinject.errors import KtInjectError
    from ktinject.families.scan import model_dir_of, scan_experts_classes
    from ktinject.families.status import static_status, verified_status
    from ktinject.families.tiny import BY_MODEL_TYPE

    unknown = [mt for mt in args.model_types if mt not in BY_MODEL_TYPE]
    if unknown:
        raise KtInjectError(f"no tiny config for model type {unknown[0]!r} (known: {', '.join(sorted(BY_MODEL_TYPE))})")
    model_types = args.model_types or sorted(BY_MODEL_TYPE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second intra-op thread only adds waits
    try:
        rows = []
        for model_type in model_types:
            status = verified_status(model_type) if args.verify else static_status(model_type)
            rows.append(status)
            if not args.markdown and sys.stdout.isatty():
                print(f"\r{len(rows)}/{len(model_types)} {model_type:<40}", end="", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(threads)
    if not args.markdown and sys.stdout.isatty():
        print("\r" + " " * 60 + "\r", end="", file=sys.stderr)
    uncovered = (
        []
        if args.model_types
        else sorted({c.model_dir for c in scan_experts_classes()} - {model_dir_of(mt) for mt in BY_MODEL_TYPE})
    )
    print(
        _markdown(rows, uncovered, transformers.__version__, args.verify) if args.markdown else _table(rows, uncovered)
    )
    return 1 if any(r.status == "failed" for r in rows) else 0


def _shown(status) -> str:
    return {"plans": "supported"}.get(status.status, status.status)


def _table(rows, uncovered: list[str]) -> str:
    header = ("model type", "built as", "rules", "experts at", "status", "reason")
    cells = [header] + [
        (r.model_type, r.model_class, r.rules, ", ".join(r.paths) or "-", _shown(r), r.reason) for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header) - 1)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(widths))) + "  " + c[-1] for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1]))
    lines.append("")
    lines += [f"{d}: experts classes in transformers.models.{d}, but no tiny config to check them" for d in uncovered]
    lines.append(_summary(rows))
    return "\n".join(line.rstrip() for line in lines)


def _summary(rows) -> str:
    ok = sum(r.ok for r in rows)
    checked = "verified against transformers" if any(r.status == "verified" for r in rows) else "planned on meta"
    others = [r.model_type for r in rows if not r.ok]
    return f"{ok} of {len(rows)} model types run with rules=auto ({checked})" + (
        f"; not: {', '.join(others)}" if others else ""
    )


def _markdown(rows, uncovered: list[str], version: str, verified: bool) -> str:
    how = "verified (tiny random models against transformers)" if verified else "planned on the meta device"
    lines = [
        f"Model types with routed experts in transformers {version}, {how} (`ktinject families"
        f"{' --verify' if verified else ''} --markdown`):",
        "",
        "| model type | built as | rules | experts at | status |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        status = _shown(r) + (f": {r.reason}" if r.status in ("unsupported", "failed") else "")
        paths = "<br>".join(f"`{p}`" for p in r.paths) or "-"
        lines.append(f"| {r.model_type} | {r.model_class} | {r.rules} | {paths} | {status.replace('|', '/')} |")
    lines.append("")
    lines += [f"- `{d}`: experts classes, but no tiny config to check them" for d in uncovered]
    lines.append(_summary(rows) + ".")
    return "\n".join(lines)
