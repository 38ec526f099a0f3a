"""Operator implementations shipped with ktinject. Importing this package registers their short names."""

from ktinject.operators import (  # noqa: F401
    attention,
    cpu_attention,
    cpu_decoder_layer,
    cpu_experts,
    cpu_linear,
    cpu_norm,
    cpu_router,
    keep,
    linear,
    marlin_linear,  # noqa: F401  (registers marlin_linear)
    torch_experts,
    torch_linear,
)
