"""The operator protocol and registry.

An operator is an ``nn.Module`` that replaces one Hugging Face module and keeps its call contract (same
forward arguments, same return), so the transformers code around it never knows. The protocol, all declared
on :class:`Operator` (docs/ARCHITECTURE.md, "The operator protocol"):

- ``from_module(module, *, name, device, config)``: build from the original module (live or on ``meta``).
- ``weight_names()`` / ``load_weights(source, prefix)``: the tensors it owns, named as in the original
  module's ``state_dict`` (relative to the module), and how it takes them from a :class:`WeightSource`.
- ``forward``: the original module's signature.
- class facts the pipeline reads: ``wants_raw_weights`` (it reads stored blocks, so its tensors need not be
  dequantizable), ``placement_only`` (it never replaces the module, only places it: ``keep``) or per device
  ``places_only(device)`` (the dispatching operators), ``yields_to_earlier_rules`` (a whole-subtree operator that
  leaves the module to its parts when an earlier rule claims one of them); ``check_device`` and
  ``estimate_bytes`` / ``estimate_stored_bytes`` for plans.

An operator's rule kwargs are validated once, when the rule file is loaded, into its frozen ``Config``
dataclass (unknown keys and wrong types are rule errors with file:line), never inside ``forward``.

Operators register a short name with :func:`register_operator`; a rule may also name any ``Operator``
subclass by dotted path (``mypkg.ops.MyExperts``) without registering.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import nn

from ktinject.errors import OperatorError
from ktinject.messages import exception_text, show

if TYPE_CHECKING:
    from ktinject.weights.source import TensorInfo, WeightSource

__all__ = [
    "C_INT_MAX",
    "KwargError",
    "Operator",
    "OperatorConfig",
    "check_int",
    "register_operator",
    "resolve_operator",
    "registered_operators",
    "validate_config",
]


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    """Kwargs of an operator that takes none. Subclass it (frozen dataclass) to declare kwargs."""


class Operator(nn.Module):
    """Base class of every replacement module. Subclasses set ``Config`` and implement the protocol."""

    op_name: ClassVar[str] = ""
    Config: ClassVar[type[OperatorConfig]] = OperatorConfig
    # True: load_weights reads ``source.parts()`` / ``source.stored_rows()`` (the blocks as stored, e.g. GGUF
    # Q4_K) rather than ``source.tensor()``; the loader then checks its tensors' names and shapes but does not
    # require that they can be dequantized.
    wants_raw_weights: ClassVar[bool] = False
    # True: the operator only places the module it matches (its tensors move to the rule's device; more
    # specific rules may claim its children). Nothing is built: from_module is never called. ``keep`` is one.
    placement_only: ClassVar[bool] = False

    # True: the operator replaces a subtree whose parts other rules could claim one by one (cpu_decoder_layer).
    # Planning then leaves the module to the next matching rule when a rule that comes first (a lower index)
    # claims one of its descendants: the rule a user wrote for a part wins over a built-in rule for the whole.
    yields_to_earlier_rules: ClassVar[bool] = False

    @classmethod
    def places_only(cls, device: torch.device) -> bool:
        """Whether this operator only places the module on ``device`` (as ``keep`` does): ``placement_only``
        by default; a dispatching operator may replace the module on one device and only place it on another
        (``attention`` keeps transformers' attention, with its projections claimed by other rules, off the CPU)."""
        return cls.placement_only

    @classmethod
    def from_module(cls, module: nn.Module, *, name: str, device: torch.device, config: OperatorConfig) -> nn.Module:
        """Build the replacement for ``module`` (named ``name`` in the model) placed on ``device``.

        When ``module`` holds real tensors the operator takes its weights from it; when it is on ``meta``
        the operator is built empty and filled later through ``load_weights``.
        """
        raise NotImplementedError(f"{cls.__name__} does not implement from_module")

    def weight_names(self) -> list[str]:
        """Names (relative to the replaced module, as in its ``state_dict``) of the tensors this operator owns."""
        return []

    def load_weights(self, source: WeightSource, prefix: str) -> None:
        """Take this operator's tensors from ``source``, named ``prefix + weight_name``."""
        raise NotImplementedError(f"{type(self).__name__} cannot load weights from a weight source yet")

    @classmethod
    def check_device(cls, device: torch.device, config: OperatorConfig) -> None:
        """Raise OperatorError when this operator cannot run on ``device`` with ``config`` (checked at plan time,
        before anything is built). Default: any device."""

    @classmethod
    def estimate_bytes(cls, module: nn.Module, config: OperatorConfig) -> int:
        """Bytes this operator will hold for ``module`` (for the plan's memory table). Default: the module's."""
        return sum(t.numel() * t.element_size() for t in module.state_dict().values())

    @classmethod
    def estimate_stored_bytes(
        cls, module: nn.Module, config: OperatorConfig, device: torch.device, stored: Mapping[str, TensorInfo]
    ) -> int:
        """Bytes this operator will hold for ``module`` on ``device`` when its weights come from a file that
        stores them as ``stored`` says (the module's ``state_dict`` names, relative to it -> stored type and
        bytes; names the file lacks are absent). Asked by plans made against a weight file (``ktinject plan``
        on a GGUF), where an operator that keeps blocks as stored holds their size, not the model dtype's.
        Default: :meth:`estimate_bytes` (the operator holds dequantized tensors)."""
        return cls.estimate_bytes(module, config)


_REGISTRY: dict[str, type[Operator]] = {}
_BUILTINS_IMPORTED = False

OpT = TypeVar("OpT", bound=type[Operator])


def register_operator(name: str):
    """Class decorator: make an ``Operator`` subclass available to rules as ``op: <name>``."""

    def decorate(cls: OpT) -> OpT:
        if not (isinstance(cls, type) and issubclass(cls, Operator)):
            raise TypeError(f"@register_operator({name!r}) must decorate an Operator subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"operator name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.op_name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _import_builtin_operators() -> None:
    # The shipped operators live in the ``ktinject.operators`` package (the repository's top-level operators/ folder), which depends on ktinject (never
    # the other way at import time): import it lazily, the first time a short name is looked up.
    global _BUILTINS_IMPORTED
    if not _BUILTINS_IMPORTED:
        _BUILTINS_IMPORTED = True
        importlib.import_module("ktinject.operators")


def registered_operators() -> dict[str, type[Operator]]:
    """Short name -> operator class, including every operator shipped with ktinject."""
    _import_builtin_operators()
    return dict(_REGISTRY)


def resolve_operator(spec: str) -> type[Operator]:
    """Turn a rule's ``op`` (short name or dotted path) into an Operator class; OperatorError otherwise."""
    if "." not in spec:
        ops = registered_operators()
        if spec not in ops:
            from difflib import get_close_matches

            hint = get_close_matches(spec, ops, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            raise OperatorError(f"unknown operator {spec!r} (known: {', '.join(sorted(ops))}){suggestion}")
        return ops[spec]
    module_path, _, attr = spec.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_path), attr)
    except (ImportError, AttributeError) as exc:
        raise OperatorError(f"cannot import operator {spec!r}: {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, Operator)):
        raise OperatorError(f"{spec!r} is not a subclass of ktinject.Operator")
    return obj


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
C_INT_MAX = (1 << 31) - 1  # the largest value a C++ ``int`` argument takes
_MAX_VALUE_DEPTH = 64  # kwargs nest like the YAML they come from (a caller's cyclic list stops here)


class KwargError(OperatorError):
    """One bad operator kwarg; ``key`` names it, so a rule error points at that key's line.

    A Config's ``__post_init__`` raises it (usually through :func:`check_int`) for values of the right type
    but outside what the operator can use.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def check_int(key: str, value: Any, low: int, high: int, meaning: str = "") -> None:
    """Raise KwargError unless ``value`` is an int (not a bool) with ``low <= value <= high``.

    For Config ``__post_init__``: a kwarg that reaches C++ must fit its C type and make sense there; checked
    when the rule file is loaded, it is a rule error with file:line instead of a failure in pybind11 or a kernel.
    ``meaning`` (e.g. ``" (0 = every CPU)"``) follows the range in the message.
    """
    if not isinstance(value, int) or isinstance(value, bool):
        raise KwargError(key, f"{key} must be an integer, got {show(value)}")
    if not low <= value <= high:
        raise KwargError(key, f"{key} must be >= {low} and <= {high}{meaning}, got {show(value)}")


def _type_ok(value: Any, annotation: Any, depth: int = 0) -> bool:
    if annotation is Any:
        return True
    if depth > _MAX_VALUE_DEPTH:
        return False
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:  # 1 == True and 1 == 1.0 in Python; a Literal[1] takes neither
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg, depth) for arg in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:  # never a bool or a float (1e3 would truncate silently); 64 bits at most
        return isinstance(value, int) and not isinstance(value, bool) and _INT64_MIN <= value <= _INT64_MAX
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return abs(value) < (1 << 1023) if isinstance(value, int) else math.isfinite(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_type_ok(v, a, depth + 1) for v, a in zip(value, args))
        return not args or all(_type_ok(v, args[0], depth + 1) for v in value)
    if origin is dict:
        if not isinstance(value, Mapping):
            return False
        return not args or all(
            _type_ok(k, args[0], depth + 1) and _type_ok(v, args[1], depth + 1) for k, v in value.items()
        )
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if annotation is int:
        return "an integer (64-bit)"
    if annotation is float:
        return "a finite number"
    if origin is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))


def validate_config(op_cls: type[Operator], kwargs: Mapping[str, Any]) -> OperatorConfig:
    """Check ``kwargs`` against ``op_cls.Config`` and build it; OperatorError names the bad key.

    Types are checked here, generally (no bool or float for an int, ints within 64 bits, finite floats,
    list/dict element types); ranges in the Config's ``__post_init__`` (:class:`KwargError`). The
    OperatorError's message starts with the offending key and ``.key`` carries it, so rule loading can
    prefix ``file:line: replace.kwargs.<key>``.
    """
    config_cls = op_cls.Config
    op_name = op_cls.op_name or op_cls.__name__
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for key, value in kwargs.items():
        if key not in fields:
            allowed = ", ".join(sorted(fields)) or "none"
            raise KwargError(key, f"unknown kwarg {show(key)} for operator {op_name} (allowed: {allowed})")
        annotation = hints.get(key, Any)
        if not _type_ok(value, annotation):
            raise KwargError(key, f"kwarg {key!r} must be {_describe(annotation)}, got {show(value)}")
    try:
        config = config_cls(**dict(kwargs))
    except KwargError:
        raise
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise OperatorError(f"bad kwargs for operator {op_name}: {exception_text(exc)}") from exc
    return config
