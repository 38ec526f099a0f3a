"""Device and dtype names as rule files, the command line and the Python API spell them.

One table of dtype names (``float32``, ``bfloat16``, ``float16``) and one way to turn a name, a torch dtype or
``"auto"`` into a ``torch.dtype``; and the ``auto`` device of rule files: the GPU when CUDA is present, else the
CPU, so the built-in rules run unchanged on a laptop.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch

from ktinject.errors import KtInjectError

logger = logging.getLogger("ktinject")

DtypeName = Literal["auto", "float32", "bfloat16", "float16"]

# The model dtypes ktinject accepts by name (operators' ``dtype`` kwargs, ``from_pretrained(dtype=)``, ``--dtype``).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None, default: torch.dtype) -> torch.dtype:
    """``None`` or ``"auto"`` -> ``default``; a torch dtype as is; a name of :data:`DTYPES` (``"torch."`` prefix
    allowed) -> that dtype. Anything else is a KtInjectError listing the names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return default
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise KtInjectError(f"dtype must be one of {', '.join(DTYPES)}, 'auto' or a torch dtype, got {dtype!r}")
    return DTYPES[name]


def config_dtype(config: Any, fallback: torch.dtype = torch.bfloat16) -> torch.dtype:
    """The dtype a transformers config names (a torch dtype or its name), else ``fallback``."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return DTYPES.get(str(dtype).removeprefix("torch."), fallback)


AUTO_DEVICE = "auto"
_logged_auto: set[str] = set()


def auto_device() -> torch.device:
    """What a rule's ``device: auto`` means on this machine: ``cuda:0`` when CUDA is available, else ``cpu``.

    Said once per process (per outcome) in the log, so a plan placed on the CPU for lack of a GPU is never a
    surprise.
    """
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if str(device) not in _logged_auto:
        _logged_auto.add(str(device))
        why = "CUDA is available" if device.type == "cuda" else "CUDA is not available"
        logger.info("device 'auto' is %s (%s); set gpu=cpu or gpu=cuda:N to choose", device, why)
    return device
