"""How messages show values: always one line, never megabytes; runs of numbers as ranges.

Input can hold anything (a 1 MiB string, a name with a newline); messages quote it shortened and with
line breaks escaped, so an error (a ``RuleError`` starts with ``file:line:``) is always a single line.
"""

from __future__ import annotations

import re
from typing import Any

_LINE_BREAKS = re.compile(r"[\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]+")
_SHOW_CHARS = 80


def one_line(text: str) -> str:
    """``text`` with every run of line breaks (as ``str.splitlines`` sees them) turned into one space."""
    return _LINE_BREAKS.sub(" ", text).strip()


def show(value: Any, limit: int = _SHOW_CHARS) -> str:
    """``repr(value)`` cut to about ``limit`` characters (the repr of a str already escapes line breaks)."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        text = repr(value[:limit])
        return (
            f"{text}... ({len(value):,} characters)" if isinstance(value, str) else f"{text}... ({len(value):,} bytes)"
        )
    try:
        text = repr(value)
    except Exception:  # a caller's object whose repr fails: its type is enough
        text = f"<{type(value).__name__}>"
    return one_line(text if len(text) <= limit else text[:limit] + "...")


def exception_text(exc: BaseException, limit: int = 300) -> str:
    """An exception's message for embedding in a rule error: first lines joined, shortened."""
    text = one_line(str(exc)) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def format_path(path: tuple[Any, ...]) -> str:
    """``("rules", 0, "replace", "op")`` -> ``rules[0].replace.op``; ``<top>`` for the document itself."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
            continue
        name = part if isinstance(part, str) and part.isprintable() and 0 < len(part) <= 64 else show(part, 40)
        out += f".{name}" if out else name
    return out or "<top>"


def format_ranges(numbers) -> str:
    """Sorted distinct integers as ranges: ``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` (``"none"`` when empty)."""
    values = sorted(set(numbers))
    if not values:
        return "none"
    parts, start, prev = [], values[0], values[0]
    for n in values[1:] + [None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ",".join(parts)
