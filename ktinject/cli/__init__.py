"""The ``ktinject`` command line: validate, plan, doctor, demo, generate."""

from __future__ import annotations

import argparse
import logging
import sys

from ktinject.errors import KtInjectError


def _parser() -> argparse.ArgumentParser:
    from ktinject.cli import demo, doctor, generate, plan_cmd, validate

    parser = argparse.ArgumentParser(prog="ktinject", description="Rule-driven CPU/GPU hybrid inference on stock transformers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (validate, plan_cmd, doctor, demo, generate):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except KtInjectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
