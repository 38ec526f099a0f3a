"""Stream the checked weights into the injected meta model, then make sure nothing is left on meta.

Operators load their own tensors (``op.load_weights(source, prefix)``: they choose between the stored
parts and dequantized tensors); every other tensor is assembled by the source directly on its device and
dtype and set on its module. A progress bar counts bytes of stored data read.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ktinject.errors import WeightError
from ktinject.loading.needs import LoadingView, Need, owner
from ktinject.planning import Plan


@dataclasses.dataclass(frozen=True)
class LoadStats:
    tensors: int
    bytes_read: int
    seconds: float


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor | nn.Parameter) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = (
            value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
        )
    elif leaf in module._buffers:
        module._buffers[leaf] = value.data if isinstance(value, nn.Parameter) else value
    else:
        raise WeightError(f"the model has no parameter or buffer {name!r} to load into")


def stream_weights(
    model: nn.Module,
    needs: list[Need],
    resolved: Mapping[str, str],
    source,
    aliases: Mapping[str, list[str]],
    *,
    progress: bool = True,
) -> LoadStats:
    """Load every need into ``model`` (in ``state_dict`` order, which follows the file's layer order)."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    total = sum(source.stored_bytes(resolved[n.name]) for n in needs)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="loading weights", disable=not progress)
    read = 0

    def count(n: int) -> None:
        nonlocal read
        read += n
        bar.update(n)

    source.on_bytes = count
    view = LoadingView(source, resolved)
    loaded_ops: set[str] = set()
    shared: dict[tuple[frozenset[str], torch.device], nn.Parameter] = {}
    try:
        with torch.no_grad():
            for need in needs:
                if need.device is None:  # an operator's tensor: the operator loads all of its own at once
                    assert need.entry is not None
                    module_name = need.entry.module_name
                    if module_name not in loaded_ops:
                        loaded_ops.add(module_name)
                        model.get_submodule(module_name).load_weights(view, module_name + ".")
                        source.end_handout()
                    continue
                group = frozenset([need.name, *aliases.get(need.name, [])])
                key = (group, need.device)
                if key not in shared:
                    spec = need.spec
                    assert spec is not None
                    tensor = source.tensor(resolved[need.name], dtype=spec.dtype, device=need.device)
                    shared[key] = nn.Parameter(tensor, requires_grad=False)
                _set_tensor(model, need.name, shared[key])
    finally:
        source.on_bytes = None
        bar.close()
    return LoadStats(len(needs), read, time.perf_counter() - start)


def place_buffers(model: nn.Module, plan: Plan, default_device: Callable[[str], torch.device]) -> None:
    """Move buffers the checkpoint does not hold (built on the CPU with the model) to their module's device."""
    for name, buffer in list(model.named_buffers(remove_duplicate=False)):
        if buffer.is_meta:
            continue
        module_name, _, leaf = name.rpartition(".")
        entry = owner(plan, module_name)
        if entry is not None and not entry.is_keep:
            continue  # operators place their own tensors
        device = entry.device if entry is not None else torch.device(default_device(module_name))
        if buffer.device != device:
            module = model.get_submodule(module_name) if module_name else model
            module._buffers[leaf] = buffer.to(device)


def check_nothing_on_meta(model: nn.Module, plan: Plan) -> None:
    """WeightError naming every module (and the rule/operator behind it) that still has meta tensors."""
    left: list[str] = []
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if not tensor.is_meta:
            continue
        module_name = name.rpartition(".")[0]
        module = model.get_submodule(module_name) if module_name else model
        entry = owner(plan, module_name)
        if entry is not None and not entry.is_keep:
            why = (
                f"in {type(model.get_submodule(entry.module_name)).__name__} from rule {entry.rule.label} "
                f"({entry.rule.location}) -> {entry.op}: its load_weights() did not set it"
            )
        else:
            why = f"in {type(module).__name__}: no weight was loaded for it"
        left.append(f"  {name} (module {module_name or '<root>'}) {why}")
    if left:
        raise WeightError(
            f"after loading, {len(left)} tensors are still on the meta device (no data):\n" + "\n".join(left)
        )


def add_input_movers(model: nn.Module, plan: Plan, needs: list[Need]) -> None:
    """When the model spans several devices, kept modules move their inputs to their device (as optimize()
    does; operators move their own inputs)."""
    from ktinject.injection import input_mover

    devices = plan.devices() | {n.device for n in needs if n.device is not None}
    if len(devices) < 2:
        return
    hooked: set[str] = set()
    for need in needs:
        if need.device is None or need.device.type == "meta":
            continue
        module_name = need.entry.module_name if need.entry is not None else need.name.rpartition(".")[0]
        if module_name not in hooked:
            hooked.add(module_name)
            module = model.get_submodule(module_name) if module_name else model
            module.register_forward_pre_hook(input_mover(need.device), with_kwargs=True)
