"""The ``ktinject`` command line: validate, plan, doctor, demo, generate, chat, serve, families."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from ktinject.errors import KtInjectError


def _parser() -> argparse.ArgumentParser:
    from ktinject import __version__
    from ktinject.cli import chat, demo, doctor, families, generate, plan_cmd, serve, validate

    parser = argparse.ArgumentParser(
        prog="ktinject", description="Rule-driven CPU/GPU hybrid inference on stock transformers."
    )
    parser.add_argument("--version", action="version", version=f"ktinject {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (default: one line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (validate, plan_cmd, doctor, demo, generate, chat, serve, families):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code.

    Errors are one line on stderr: exit code 2 for a ``KtInjectError`` (bad input: rules, files, flags),
    1 for anything else; ``--debug`` adds the traceback.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.run(args) or 0)
    except KtInjectError as exc:
        _report(exc, args.debug)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - a command line answers in one line; --debug shows the rest
        _report(exc, args.debug, unexpected=True)
        return 1


def _report(exc: BaseException, debug: bool, *, unexpected: bool = False) -> None:
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    text = str(exc).strip()
    line = text  # our own messages are written for this line (a WeightError may list several tensors)
    if unexpected:  # others' messages can run for pages: their first line, and the exception's type
        line = text.splitlines()[0] if text else ""
        line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
        if not debug:
            line += " (run with --debug for the traceback)"
    print(f"error: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
