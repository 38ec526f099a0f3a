"""validate_config: kwargs checked against an operator's typed Config, generally and by its own ranges."""

import dataclasses
import math
from typing import Literal, Optional

import pytest

from ktinject import OperatorError
from ktinject.operator import C_INT_MAX, KwargError, Operator, OperatorConfig, check_int, validate_config


@dataclasses.dataclass(frozen=True)
class _Config(OperatorConfig):
    count: int = 1
    scale: float = 1.0
    mode: Literal["a", "b", 1] = "a"
    ids: list[int] = dataclasses.field(default_factory=list)
    table: dict[str, float] = dataclasses.field(default_factory=dict)
    pair: tuple[int, str] = (0, "")
    maybe: Optional[int] = None
    flag: bool = False

    def __post_init__(self) -> None:
        check_int("count", self.count, 0, C_INT_MAX, " (0 = none)")


class _Op(Operator):
    op_name = "test_op"
    Config = _Config


def error(**kwargs) -> KwargError:
    with pytest.raises(KwargError) as info:
        validate_config(_Op, kwargs)
    return info.value


@pytest.mark.parametrize(
    "kwargs, key, fragment",
    [
        ({"count": True}, "count", "kwarg 'count' must be an integer (64-bit), got True"),
        ({"count": 2.0}, "count", "must be an integer (64-bit), got 2.0"),
        ({"count": "3"}, "count", "got '3'"),
        ({"count": 2**63}, "count", "got 9223372036854775808"),
        ({"count": 2**40}, "count", "count must be >= 0 and <= 2147483647 (0 = none), got 1099511627776"),
        ({"count": -1}, "count", "count must be >= 0"),
        ({"scale": math.nan}, "scale", "must be a finite number, got nan"),
        ({"scale": math.inf}, "scale", "must be a finite number"),
        ({"scale": False}, "scale", "must be a finite number, got False"),
        ({"scale": 10**400}, "scale", "must be a finite number"),
        ({"mode": True}, "mode", "must be one of 'a', 'b', 1, got True"),
        ({"mode": 1.0}, "mode", "got 1.0"),
        ({"ids": [1, "2"]}, "ids", "must be list[int]"),
        ({"ids": [1, True]}, "ids", "must be list[int]"),
        ({"table": {"a": "x"}}, "table", "must be dict[str, float]"),
        ({"table": {1: 2.0}}, "table", "must be dict[str, float]"),
        ({"pair": [1]}, "pair", "must be tuple[int, str]"),
        ({"maybe": 1.5}, "maybe", "must be an integer (64-bit) or null"),
        ({"flag": 1}, "flag", "must be bool, got 1"),
        (
            {"nosuch": 1},
            "nosuch",
            "unknown kwarg 'nosuch' for operator test_op (allowed: count, flag, ids, maybe, mode, pair, scale, table)",
        ),
    ],
)
def test_bad_kwargs_name_their_key(kwargs, key, fragment):
    err = error(**kwargs)
    assert err.key == key and fragment in str(err), str(err)
    assert isinstance(err, OperatorError) and isinstance(err, ValueError)


def test_good_kwargs_build_the_config():
    config = validate_config(
        _Op,
        {
            "count": 3,
            "scale": 2,
            "mode": 1,
            "ids": [1, 2],
            "table": {"a": 1},
            "pair": [1, "x"],
            "maybe": None,
            "flag": True,
        },
    )
    assert config.count == 3 and config.scale == 2 and config.mode == 1 and config.pair == [1, "x"]


def test_huge_values_are_shortened_in_messages():
    message = str(error(mode="m" * 100_000))
    assert len(message) < 300 and "(100,000 characters)" in message


def test_other_config_errors_are_operator_errors():
    @dataclasses.dataclass(frozen=True)
    class Strict(OperatorConfig):
        n: int = 0

        def __post_init__(self) -> None:
            raise ZeroDivisionError("no")

    class StrictOp(Operator):
        Config = Strict

    with pytest.raises(OperatorError, match="bad kwargs for operator StrictOp: no"):
        validate_config(StrictOp, {})
