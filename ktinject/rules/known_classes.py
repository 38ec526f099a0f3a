"""Names a bare ``match.class`` may use, so a typo is an error at load time instead of a rule that never fires.

The index is every class defined in transformers' modelling files (read as text, not imported: importing
hundreds of model files would take many seconds), every ``torch.nn`` module class, and every registered
operator. Classes defined elsewhere (remote code, your own package) are matched by dotted path instead.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import torch

_CLASS_DEF = re.compile(r"^class\s+([A-Za-z_]\w*)\s*[(:]", re.MULTILINE)


@functools.lru_cache(maxsize=1)
def known_class_names() -> frozenset[str]:
    names: set[str] = {n for n in dir(torch.nn) if isinstance(getattr(torch.nn, n, None), type)}
    spec = importlib.util.find_spec("transformers")
    if spec is not None and spec.origin:
        models = Path(spec.origin).parent / "models"
        for path in models.glob("*/modeling_*.py"):
            try:
                names.update(_CLASS_DEF.findall(path.read_text(encoding="utf-8", errors="replace")))
            except OSError:
                continue
    from ktinject.operator import registered_operators

    names.update(cls.__name__ for cls in registered_operators().values())
    return frozenset(names)


def is_known_class_name(name: str) -> bool:
    return name in known_class_names()
