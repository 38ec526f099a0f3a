"""Operator implementations shipped with ktinject. Importing this package registers their short names."""

from ktinject.operators import cpu_experts, cpu_linear, keep, linear, torch_experts, torch_linear  # noqa: F401
from ktinject.operators import marlin_linear  # noqa: F401  (registers marlin_linear)
