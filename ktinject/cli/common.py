"""Options shared by several commands: --set, and reading a model config."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ktinject.errors import KtInjectError, RuleError


def add_vars_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="vars",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a rule variable (repeatable), e.g. --set gpu=cpu --set cpu_threads=8",
    )


def parse_vars(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; values are read as YAML (8 -> int, true -> bool, cuda:0 -> str) under the rule files'
    bounds. A value that is not YAML is a RuleError naming the --set; unknown KEYs are rejected by rule loading."""
    from ktinject.messages import exception_text, show
    from ktinject.rules.yaml_reader import YamlProblem, read_value

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RuleError(f"--set expects KEY=VALUE, got {show(item)}")
        try:
            out[key] = read_value(value) if value.strip() else ""
        except YamlProblem as problem:
            raise RuleError(
                f"--set {show(item)}: the value is not valid YAML: {exception_text(problem)} "
                "(quote it, e.g. --set 'KEY=\"...\"', to pass a string)"
            ) from None
    return out


def load_config(path: str):
    """A transformers config from a model directory or a config.json file (never from a hub)."""
    from ktinject.loading.model import config_from_json, one_line

    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise KtInjectError(f"{p} has no config.json")
        p = p / "config.json"
    elif not p.is_file():
        raise KtInjectError(f"config not found: {path} (give a model directory or a config.json)")
    try:
        return config_from_json(p)
    except KtInjectError:
        raise
    except (ValueError, KeyError, TypeError, OSError) as exc:  # transformers' own words for configs it cannot read
        raise KtInjectError(f"{p}: transformers cannot read this config: {one_line(exc)}") from exc
