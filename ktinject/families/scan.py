"""The experts classes of the installed transformers, found by reading its modeling files (nothing imported).

What ``ktinject families`` and the tests compare the tiny configs against: a transformers upgrade that adds a
family with routed experts shows up here before anyone writes a config for it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

_WEIGHT_WORDS = ("gate_up_proj", "up_proj", "down_proj", "mlp.w1", "nn.Parameter(torch.empty(num_experts")
_CLASS = re.compile(r"^((?:@[^\n]*\n)*)class (\w+)\b[^\n]*:\n((?:[ \t]+[^\n]*\n|\n)*)", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class ExpertsClass:
    """One experts class in a transformers modeling file."""

    model_dir: str  # transformers.models.<model_dir>
    class_name: str
    decorator: str | None  # the @use_experts_implementation(...) text, None when undecorated


@functools.lru_cache(maxsize=1)
def scan_experts_classes() -> tuple[ExpertsClass, ...]:
    """Experts classes of every modeling file in the installed transformers (read as text, not imported).

    A top-level class counts when ``@use_experts_implementation`` decorates it, or when it is named
    ``*Experts`` and holds stacked expert weights (the undecorated Llama-4, LongCat, Step-3.7, DBRX...).
    """
    import transformers

    models = Path(transformers.__file__).parent / "models"
    found = []
    for path in sorted(models.glob("*/modeling_*.py")):
        source = path.read_text(encoding="utf-8")
        if "Experts" not in source and "use_experts_implementation" not in source:
            continue
        for match in _CLASS.finditer(source):
            decorators, name, body = match.groups()
            decorator = next((d[1:] for d in decorators.splitlines() if "use_experts_implementation" in d), None)
            if decorator or (name.endswith("Experts") and any(w in body for w in _WEIGHT_WORDS)):
                found.append(ExpertsClass(path.parent.name, name, decorator))
    return tuple(found)


def model_dir_of(model_type: str) -> str:
    """The transformers.models sub-package that implements ``model_type``."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    return model_type_to_module_name(model_type)
