"""One exception family for everything ktinject reports to users.

Messages say what was expected, what was found, and where (file:line, tensor name, rule name).
"""

from __future__ import annotations


class KtInjectError(Exception):
    """Base class of every error ktinject raises on purpose."""


class RuleError(KtInjectError, ValueError):
    """A rule file (or a rule given in code) is wrong: the message starts with ``file:line: key:``."""


class WeightError(KtInjectError, ValueError):
    """A weight is missing, has the wrong shape or type, or a weight file is damaged."""


class OperatorError(KtInjectError, ValueError):
    """An operator cannot be built for the module a rule matched (wrong module type, bad kwargs...)."""
