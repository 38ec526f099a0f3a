"""transformers' optional outputs (``output_hidden_states``, ``output_router_logits``, ``output_attentions``) for
modules ktinject replaced.

transformers v5 records those outputs with forward hooks on the modules of the classes each model declares in
``_can_record_outputs`` (a decoder-layer class, a router class...), matched by ``isinstance``. An operator that
replaces such a module keeps its call contract (the same output at the same index) but is not of that class, so
after injection each declaration naming a replaced class is extended with the operator's class: the outputs are
then recorded from the operators as they were from the modules. Without this, ``output_router_logits=True`` on a
model whose routers are ``cpu_router`` would find no router logits.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

from torch import nn

logger = logging.getLogger("ktinject")


def replaced_classes(original: nn.Module, operator: nn.Module) -> set[tuple[type, type]]:
    """(original class, operator class) for a replaced module and, for an operator built from parts (a whole
    decoder layer), for each part at the same path: the router inside a fused layer is still a router."""
    before = {name: type(m) for name, m in original.named_modules()}
    pairs = set()
    for name, m in operator.named_modules():
        cls = before.get(name)
        if cls is not None and cls is not type(m):
            pairs.add((cls, type(m)))
    return pairs


def register_replaced_outputs(model: nn.Module, replaced: Iterable[tuple[type, type]]) -> None:
    """Extend the output declarations of ``model`` (and of the pretrained submodels in it) so that, for each
    (original class, operator class) in ``replaced``, what was recorded from the original is recorded from the
    operator. A no-op when this transformers has no such mechanism."""
    try:
        from transformers.modeling_utils import PreTrainedModel
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, OutputRecorder
    except ImportError:
        return
    mapping = dict(replaced)
    if not mapping:
        return
    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        flags = _CAN_RECORD_REGISTRY.get(module)
        if not flags:
            continue
        if getattr(module, "_output_capturing_hooks_installed", False):
            logger.warning(
                "%s recorded optional outputs before ktinject replaced its modules: output_hidden_states / "
                "output_router_logits may miss the replaced ones",
                type(module).__name__,
            )
            continue
        extended = {name: _extend(specs, mapping, OutputRecorder, name) for name, specs in flags.items()}
        if extended != flags:
            _CAN_RECORD_REGISTRY[module] = extended  # the registry keys by the model's class


def _extend(specs, mapping: dict[type, type], recorder_cls, name: str):
    items = specs if isinstance(specs, list) else [specs]
    out = list(items)
    for spec in items:
        if isinstance(spec, recorder_cls):
            target, make = spec.target_class, lambda cls, s=spec: dataclasses.replace(s, target_class=cls)
        elif isinstance(spec, type):
            index = 0 if "hidden_states" in name else 1
            target, make = spec, lambda cls, i=index: recorder_cls(target_class=cls, index=i)
        else:
            continue
        for original, operator in mapping.items():
            if target is not None and issubclass(original, target) and not issubclass(operator, target):
                new = make(operator)
                if new not in out:
                    out.append(new)
    return out if isinstance(specs, list) or len(out) > 1 else specs


try:  # transformers >= 5: the outputs being recorded in this context
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - nothing is ever recorded
    _active_collector = None


def recording(key: str) -> bool:
    """Whether transformers is recording the optional output ``key`` (e.g. ``"router_logits"``) right now: an
    operator that fuses away the module whose output is recorded runs it separately then. Called per layer per
    step: the import is done once, above."""
    if _active_collector is None:
        return False
    collected = _active_collector.get()
    return collected is not None and key in collected
