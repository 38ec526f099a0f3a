"""Every tensor the injected model needs, who needs it, and the check that the weights have them all.

After the rules are applied on the meta model, each tensor of the original ``state_dict`` belongs either to
an operator (which declares its tensors with ``weight_names()``) or to a kept module (placed by a ``keep``
rule, or by ``device_map`` when no rule covers it). :func:`collect_needs` lists them with the rule that
caused the need; :func:`check_needs` resolves every one against the weight source (names, shapes,
dequantizable types) and raises one ``WeightError`` listing every problem, before any data is read.
Tied tensors (``lm_head.weight`` is ``embed_tokens.weight``) are one tensor with several names: any of the
names present in the file serves all of them.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import nn

from ktinject.errors import WeightError
from ktinject.operator import Operator
from ktinject.planning import Plan, PlanEntry
from ktinject.weights.source import RawTensor, WeightSource


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor of the meta model (the HF model before any replacement)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class Need:
    """One tensor the model needs from the weights."""

    name: str
    spec: TensorSpec | None  # None: an operator's own name, not in the HF state_dict
    consumer: str  # "rule experts (qwen3_moe.yaml:5) -> torch_experts"
    raw: bool  # the consumer reads stored parts, no dequantization
    device: torch.device | None  # kept tensors: where they go (operators place their own)
    entry: PlanEntry | None  # the plan entry that needs it (None: not placed by any rule)


def tensor_specs(model: nn.Module) -> dict[str, TensorSpec]:
    """``state_dict`` name -> spec, for the model as built (before injection)."""
    return {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def tied_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Name -> the other names of the same tensor (tied parameters and buffers)."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        groups[id(tensor)].append(name)
    return {n: [m for m in names if m != n] for names in groups.values() if len(names) > 1 for n in names}


def owner(plan: Plan, module_name: str) -> PlanEntry | None:
    """The deepest plan entry whose module is ``module_name`` or one of its ancestors."""
    best = None
    for entry in plan.entries:
        m = entry.module_name
        if m == "" or module_name == m or module_name.startswith(m + "."):
            if best is None or len(m) > len(best.module_name):
                best = entry
    return best


def consumer_label(entry: PlanEntry | None, device: torch.device | None = None) -> str:
    if entry is None:
        return f"no rule (device_map -> {device})"
    rule = entry.rule
    op = f"keep on {entry.device}" if entry.is_keep else entry.op
    return f"rule {rule.label} ({rule.location}) -> {op}"


def collect_needs(model: nn.Module, plan: Plan, specs: Mapping[str, TensorSpec], default_device) -> list[Need]:
    """Every tensor to load, in ``state_dict`` order; ``model`` has its operators injected already.

    ``default_device(module_name)`` places tensors of modules no rule covers.
    """
    needs: list[Need] = []
    seen_ops: set[str] = set()
    for name, spec in specs.items():
        module_name = name.rpartition(".")[0]
        entry = owner(plan, module_name)
        if entry is not None and not entry.is_keep:
            if entry.module_name in seen_ops:
                continue
            seen_ops.add(entry.module_name)
            op = model.get_submodule(entry.module_name)
            # The built operator decides (``linear`` builds a cpu_linear on the CPU, a torch_linear elsewhere).
            raw = isinstance(op, Operator) and op.wants_raw_weights
            prefix = entry.module_name + "."
            for weight in op.weight_names():
                full = prefix + weight
                needs.append(Need(full, specs.get(full), consumer_label(entry), raw, None, entry))
            continue
        device = entry.device if entry is not None else torch.device(default_device(module_name))
        needs.append(Need(name, spec, consumer_label(entry, device), False, device, entry))
    return needs


def check_needs(needs: list[Need], source, aliases: Mapping[str, list[str]]) -> dict[str, str]:
    """Resolve every need against ``source`` (no data read); returns need name -> name to read it under.

    Raises one WeightError listing every missing, mis-shaped or unreadable tensor with the rule that
    needed it.
    """
    resolved: dict[str, str] = {}
    problems: list[str] = []
    for need in needs:
        shape = need.spec.shape if need.spec is not None else None
        first_problem = None
        for candidate in [need.name, *aliases.get(need.name, [])]:
            problem = source.check(candidate, shape, dequantize=not need.raw)
            if problem is None:
                resolved[need.name] = candidate
                break
            first_problem = first_problem or problem
        else:
            problems.append(f"  {need.name}: {first_problem}  [needed by {need.consumer}]")
    if problems:
        total = len({n.name for n in needs})
        raise WeightError(
            f"{len(problems)} of {total} tensors the model needs cannot be loaded from {source.description} "
            f"(checked before loading; nothing was read):\n" + "\n".join(problems)
        )
    return resolved


class LoadingView(WeightSource):
    """The source as operators see it during loading: names resolved through the check (tied aliases)."""

    def __init__(self, source: WeightSource, resolved: Mapping[str, str]) -> None:
        self._source = source
        self._resolved = resolved

    def _name(self, name: str) -> str:
        return self._resolved.get(name, name)

    def names(self):
        return self._source.names()

    def parts(self, name: str) -> list[RawTensor]:
        return self._source.parts(self._name(name))

    def tensor(
        self, name: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        return self._source.tensor(self._name(name), dtype=dtype, device=device)

    def tensor_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._source.tensor_rows(self._name(name), start, stop, dtype=dtype)

    def stored_rows(self, name: str) -> RawTensor | None:
        return self._source.stored_rows(self._name(name))

    def release(self) -> None:
        self._source.release()
