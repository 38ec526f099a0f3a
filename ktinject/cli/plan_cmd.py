"""``ktinject plan --config C --rules R``: the dry run on a model built on the meta device.

``C`` is a model directory, a config.json or a GGUF file. A GGUF gives the config (from its metadata, as
``from_pretrained`` reads it) and the stored types: operators that keep blocks as stored (``cpu_experts``,
``cpu_linear``) count their stored size, so a Q4_K_M file's plan shows what loading it will take. Only the
header and tensor index are read.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ktinject.cli.common import add_vars_option, load_config, parse_vars


def register(sub) -> None:
    p = sub.add_parser("plan", help="show which rule claims which module of a model (no weights needed)")
    p.add_argument(
        "--config", required=True, help="model directory, config.json, or a GGUF file (any file of a split set)"
    )
    p.add_argument("--rules", default="auto", help="rule file, built-in name, or 'auto' (by model_type; default)")
    p.add_argument("--full", action="store_true", help="one row per module instead of grouping layers")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (one object: entries, memory, warnings)")
    add_vars_option(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ktinject.injection import plan_for
    from ktinject.loading.model import build_meta_model
    from ktinject.planning import format_plan

    start = time.perf_counter()
    source = None
    if _is_gguf(Path(args.config)):
        from ktinject.weights.gguf_config import config_from_gguf
        from ktinject.weights.gguf_source import GGUFSource

        source = GGUFSource(args.config)
        config = config_from_gguf(source)
    else:
        config = load_config(args.config)
    model = build_meta_model(config)
    if source is not None:
        source.bind(model)
    p = plan_for(model, args.rules, vars=parse_vars(args.vars), source=source)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps(plan_json(p, config.model_type, source.description if source else None), indent=1))
        return 0
    if args.full:
        for e in p:
            print(
                f"{e.module_name or '<root>'}\t{e.module_class}\t{e.rule.label}\t{e.op}\t{e.device}\t{e.estimated_bytes}"
            )
    else:
        print(format_plan(p))
    stored = f", memory at the types stored in {source.description}" if source is not None else ""
    print(f"model_type {config.model_type}, {len(p.rules.files)} rule files{stored}, planned in {seconds:.1f} s")
    return 0


def _is_gguf(path: Path) -> bool:
    """A GGUF by name, or by its magic (a file named otherwise would fail as a config with a UTF-8 error)."""
    if path.suffix == ".gguf":
        return True
    try:
        with path.open("rb") as f:
            return path.is_file() and f.read(4) == b"GGUF"
    except OSError:
        return False


def plan_json(p, model_type: str, weights: str | None) -> dict:
    """The plan as plain data: what a script reading ``ktinject plan --json`` gets (sizes in bytes)."""
    return {
        "model_type": model_type,
        "weights": weights,
        "rule_files": list(p.rules.files),
        "entries": [
            {
                "module": e.module_name,
                "class": e.module_class,
                "rule": e.rule.label,
                "location": str(e.rule.location),
                "op": e.op,
                "device": str(e.device),
                "bytes": e.estimated_bytes,
            }
            for e in p
        ],
        "memory_by_device": p.memory_by_device(),
        "unmatched_rules": [
            {"rule": r.label, "location": str(r.location), "builtin": r not in p.suspicious_unmatched_rules}
            for r in p.unmatched_rules
        ],
        "uncovered_modules": list(p.uncovered_modules),
    }
