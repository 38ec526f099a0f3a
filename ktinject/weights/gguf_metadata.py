"""GGUF metadata values, each checked against what the caller needs before it is used.

A damaged or hostile file can hold anything under a key: a string where a count belongs, a NaN epsilon, a
negative or 2**60 head count, bytes that are not UTF-8. Every accessor here checks the stored GGUF value
type and the value's range and raises a ``WeightError`` naming the file and the key, so no such value
reaches transformers (where it would be a ZeroDivisionError, an allocator error or, worse, a model that
loads and computes garbage).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ktinject.errors import WeightError

_MISSING: Any = ...


def _integer_types():
    from gguf import GGUFValueType as V

    return {V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64}


def _float_types():
    from gguf import GGUFValueType as V

    return {V.FLOAT32, V.FLOAT64}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class GGUFMetadata:
    """The key/value metadata of a GGUF model (every file of a split set; the first file's value wins)."""

    def __init__(self, fields: Mapping[str, Any], where: str) -> None:
        self._fields = dict(fields)
        self.where = where
        self.arch = ""  # replaces "{arch}" in keys once known

    def key(self, key: str) -> str:
        return key.replace("{arch}", self.arch)

    def __contains__(self, key: str) -> bool:
        return self.key(key) in self._fields

    def type_name(self, key: str) -> str:
        """The stored value type for messages (``UINT32``, ``ARRAY[STRING]``...)."""
        types = self._fields[self.key(key)].types
        if not types:
            return "?"
        if len(types) > 1:
            return f"{types[0].name}[{types[-1].name}]"
        return types[0].name

    def _missing(self, key: str, default: Any, needed_for: str) -> Any:
        if default is not _MISSING:
            return default
        why = f" (needed for {needed_for})" if needed_for else ""
        raise WeightError(f"{self.where}: GGUF metadata key {self.key(key)} is missing{why}")

    def _wrong(self, key: str, value: Any, expected: str) -> WeightError:
        return WeightError(
            f"{self.where}: GGUF metadata key {self.key(key)} is {_shown(value)} ({self.type_name(key)}), "
            f"expected {expected}"
        )

    def value(self, key: str, default: Any = _MISSING, *, needed_for: str = "") -> Any:
        """The value as Python (str, int, float, bool or list), unchecked but decoded safely."""
        from gguf import GGUFValueType

        field = self._fields.get(self.key(key))
        if field is None:
            return self._missing(key, default, needed_for)
        try:
            value = field.contents()
        except UnicodeDecodeError as exc:
            raise WeightError(
                f"{self.where}: GGUF metadata key {self.key(key)} is not valid UTF-8 "
                f"({exc.reason} at byte {exc.start}); the file is corrupt"
            ) from None
        except (IndexError, ValueError, TypeError) as exc:
            raise WeightError(
                f"{self.where}: GGUF metadata key {self.key(key)} cannot be read ({type(exc).__name__}: "
                f"{exc}); the file is corrupt"
            ) from None
        kind = field.types[0] if field.types else None
        if kind == GGUFValueType.BOOL:
            return bool(value)
        if kind == GGUFValueType.FLOAT32:  # 1e-6 was stored as float32: give back 1e-06, not 9.99999997e-07
            return float(str(np.float32(value)))
        return value

    def length(self, key: str) -> int | None:
        """How many items an array value has (None when the key is absent), without decoding them."""
        from gguf import GGUFValueType

        field = self._fields.get(self.key(key))
        if field is None:
            return None
        if not field.types or field.types[0] != GGUFValueType.ARRAY:
            raise self._wrong(key, self.value(key), "an array")
        return len(field.data)

    def _kind(self, key: str):
        field = self._fields[self.key(key)]
        return field.types[0] if field.types else None

    def text(self, key: str, default: Any = _MISSING, *, needed_for: str = "") -> Any:
        """A string value."""
        from gguf import GGUFValueType

        if key not in self:
            return self._missing(key, default, needed_for)
        value = self.value(key)
        if self._kind(key) != GGUFValueType.STRING:
            raise self._wrong(key, value, "a string")
        return value

    def integer(
        self, key: str, default: Any = _MISSING, *, minimum: int = 1, maximum: int | None = None, needed_for: str = ""
    ) -> Any:
        """An integer value in ``[minimum, maximum]`` (sizes and counts default to at least 1)."""
        if key not in self:
            return self._missing(key, default, needed_for)
        value = self.value(key)
        if self._kind(key) not in _integer_types():
            raise self._wrong(key, value, "an integer")
        self._check_range(key, value, minimum, maximum)
        return int(value)

    def integers(
        self, key: str, default: Any = _MISSING, *, minimum: int = 1, maximum: int | None = None, needed_for: str = ""
    ) -> Any:
        """An integer, or an array of integers (one per layer), each in ``[minimum, maximum]``."""
        from gguf import GGUFValueType

        if key not in self:
            return self._missing(key, default, needed_for)
        field = self._fields[self.key(key)]
        if field.types and field.types[0] == GGUFValueType.ARRAY:
            values = self.value(key)
            if len(field.types) < 2 or field.types[-1] not in _integer_types() or not values:
                raise self._wrong(key, values, "an integer or a non-empty array of integers")
            for v in values:
                self._check_range(key, v, minimum, maximum)
            return [int(v) for v in values]
        return self.integer(key, minimum=minimum, maximum=maximum)

    def _check_range(self, key: str, value: int, minimum: int, maximum: int | None) -> None:
        if value < minimum:
            raise self._wrong(key, value, f"an integer >= {minimum}")
        if maximum is not None and value > maximum:
            raise self._wrong(key, value, f"an integer <= {maximum}")

    def number(self, key: str, default: Any = _MISSING, *, positive: bool = True, needed_for: str = "") -> Any:
        """A finite float (stored as a float: llama.cpp refuses other types too); ``positive``: also > 0."""
        if key not in self:
            return self._missing(key, default, needed_for)
        value = self.value(key)
        if self._kind(key) not in _float_types():
            raise self._wrong(key, value, "a float")
        value = float(value)
        if not math.isfinite(value) or (positive and value <= 0):
            raise self._wrong(key, value, "a finite number > 0" if positive else "a finite number")
        return value

    def flag(self, key: str, default: Any = _MISSING, *, needed_for: str = "") -> Any:
        """A boolean value."""
        from gguf import GGUFValueType

        if key not in self:
            return self._missing(key, default, needed_for)
        value = self.value(key)
        if self._kind(key) != GGUFValueType.BOOL:
            raise self._wrong(key, value, "a boolean")
        return value
