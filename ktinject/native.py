"""Access to the compiled extension (``ktinject._native``).

The extension is optional at import time so that pure-Python parts (rules, planning, the torch operators)
work even when the build failed; operators that need it call :func:`native` and get a clear error.
``KTINJECT_NATIVE=/path/to/_native*.so`` loads a specific build (used while developing kernels in a
separate CMake build directory).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

from ktinject.errors import KtInjectError

_module: ModuleType | None = None


def native() -> ModuleType:
    """Return the loaded extension module, or raise KtInjectError saying how to build it."""
    global _module
    if _module is not None:
        return _module
    try:
        override = os.environ.get("KTINJECT_NATIVE")
        if override:
            spec = importlib.util.spec_from_file_location("ktinject._native", override)
            if spec is None or spec.loader is None:
                raise ImportError(f"KTINJECT_NATIVE={override!r} is not a loadable extension")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module("ktinject._native")
    except ImportError as exc:
        raise KtInjectError(
            "the ktinject C++ extension is not available "
            f"({exc}); build it with `pip install -e .` (needs cmake, a C++17 compiler and pybind11)"
        ) from exc
    _module = module
    return module


def native_available() -> bool:
    """True when the extension imports; never raises."""
    try:
        native()
    except KtInjectError:
        return False
    return True
