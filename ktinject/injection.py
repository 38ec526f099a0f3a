"""``optimize(model, rules)``: carry out a plan on the model, in place.

:func:`inject` is the part ``optimize`` and ``from_pretrained`` share: load the rules, plan, check devices and
build every replacing operator (from the live module here, on ``meta`` when loading from files). Then
``optimize`` makes a second pass: every ``keep`` entry moves the tensors it owns (those of its subtree that no
more specific entry claims) to its device. Nothing is moved twice, and tied tensors stay tied when they end
up on the same device. When the plan spans several devices, kept modules get a forward pre-hook that
moves incoming tensors to their device (operators move their own inputs and return on the caller's device).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ktinject.errors import KtInjectError, OperatorError
from ktinject.output_capture import register_replaced_outputs, replaced_classes
from ktinject.planning import Plan, PlanEntry, plan
from ktinject.rules import RulesLike, load_rules
from ktinject.weights.assembled import FileSource

logger = logging.getLogger("ktinject")

PLAN_ATTRIBUTE = "_ktinject_plan"


def check_devices(p: Plan) -> None:
    """Every device a rule names must exist on this machine (planning alone does not need them)."""
    for entry in p.entries:
        device = entry.device
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise KtInjectError(
                    f"rule {entry.rule.label} ({entry.rule.location}) places {entry.module_name or '<root>'} on {device}, "
                    "but CUDA is not available here; give the built-in rules vars={'gpu': 'cpu'} (CLI: --set gpu=cpu) "
                    "or leave gpu at its default 'auto' (the GPU when there is one, else the CPU)"
                )
            index = device.index or 0
            if index >= torch.cuda.device_count():
                raise KtInjectError(
                    f"rule {entry.rule.label} ({entry.rule.location}) names {device}, but only "
                    f"{torch.cuda.device_count()} CUDA device(s) exist"
                )
        elif device.type not in ("cpu", "meta") and not hasattr(torch, device.type):
            raise KtInjectError(
                f"rule {entry.rule.label} ({entry.rule.location}): unsupported device type {device.type!r}"
            )


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = new


def build_operator(model: nn.Module, entry: PlanEntry) -> None:
    """Replace ``entry``'s module in ``model`` by its rule's operator (built from the live module, or on meta
    when loading from files). Shared by optimize() and from_pretrained(); errors name the rule."""
    if entry.module_name == "":
        raise KtInjectError(
            f"rule {entry.rule.label} ({entry.rule.location}) would replace the whole model; use op: keep for the root"
        )
    module = model.get_submodule(entry.module_name)
    replace = entry.rule.replace
    try:
        op = replace.op_class.from_module(module, name=entry.module_name, device=replace.device, config=replace.config)
    except OperatorError as exc:
        raise OperatorError(f"rule {entry.rule.label} ({entry.rule.location}): {exc}") from None
    _set_submodule(model, entry.module_name, op)


def _move_owned_tensors(
    root: nn.Module, root_name: str, device: torch.device, claimed: set[str], moved: dict[int, Any]
) -> None:
    stack = [(root_name, root)]
    while stack:
        name, module = stack.pop()
        for key, param in list(module._parameters.items()):
            if param is not None and param.device != device:
                if id(param) not in moved:
                    moved[id(param)] = nn.Parameter(param.data.to(device), requires_grad=param.requires_grad)
                module._parameters[key] = moved[id(param)]
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                if id(buf) not in moved:
                    moved[id(buf)] = buf.to(device)
                module._buffers[key] = moved[id(buf)]
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if full not in claimed:
                stack.append((full, child))


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device, non_blocking=True)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def input_mover(device: torch.device):
    """A forward pre-hook moving a kept module's tensor inputs to ``device`` (models spanning devices)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _to_device(args, device), _to_device(kwargs, device)

    return hook


def inject(
    model: nn.Module,
    rules: RulesLike,
    *,
    vars: Mapping[str, Any] | None = None,
    model_type: str | None = None,
    source: FileSource | None = None,
) -> Plan:
    """Apply ``rules`` to ``model`` up to the point where weights matter: the steps ``optimize()`` and
    ``from_pretrained()`` share.

    Loads the rules (``"auto"`` by ``model_type``), plans, checks that every device exists, warns about rules
    that matched nothing, and swaps every replacing operator in (built from the live module, or empty on
    ``meta`` to be filled by ``load_weights``). Kept modules are not moved here: ``optimize()`` moves live
    tensors, ``from_pretrained()`` loads them where they go. ``source``: the weight file the plan is made
    against (memory at the stored types).
    """
    ruleset = load_rules(rules, vars=vars, model_type=model_type, model=model)
    p = plan(model, ruleset, source=source)
    check_devices(p)
    for rule in p.unmatched_rules:
        level = logging.WARNING if rule in p.suspicious_unmatched_rules else logging.DEBUG
        logger.log(level, "rule %s (%s) matched no module", rule.label, rule.location)
    replaced: set[tuple[type, type]] = set()
    with torch.no_grad():
        for entry in p.entries:
            if not entry.is_keep:
                original = model.get_submodule(entry.module_name)
                build_operator(model, entry)
                replaced |= replaced_classes(original, model.get_submodule(entry.module_name))
    register_replaced_outputs(model, replaced)
    return p


def optimize(model: nn.Module, rules: RulesLike, *, vars: Mapping[str, Any] | None = None) -> Plan:
    """Replace and place ``model``'s modules as ``rules`` say, in place; returns the plan that was applied.

    ``rules``: a rule file path, a built-in name, ``"auto"`` (by ``model.config.model_type``), YAML text or
    a loaded RuleSet. ``vars`` override rule variables. Call it before the first forward pass.
    """
    if hasattr(model, PLAN_ATTRIBUTE):
        raise KtInjectError("this model was already optimized by ktinject; start again from the original model")
    p = inject(model, rules, vars=vars, model_type=_model_type(model))
    claimed = {e.module_name for e in p.entries}
    moved: dict[int, Any] = {}
    multi_device = len(p.devices()) > 1
    with torch.no_grad():
        for entry in p.entries:
            if entry.is_keep:
                module = model.get_submodule(entry.module_name)
                _move_owned_tensors(module, entry.module_name, entry.device, claimed, moved)
                if multi_device and entry.device.type != "meta":
                    module.register_forward_pre_hook(input_mover(entry.device), with_kwargs=True)
    setattr(model, PLAN_ATTRIBUTE, p)
    return p


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def plan_for(
    model: nn.Module, rules: RulesLike, *, vars: Mapping[str, Any] | None = None, source: FileSource | None = None
) -> Plan:
    """``ktinject.plan``: the dry run of ``optimize`` (nothing is changed; devices need not exist).

    ``source``: a weight file the model would be loaded from (e.g. a ``GGUFSource`` bound to ``model``); the
    memory column then counts what operators keep as stored (GGUF blocks) at its stored size.
    """
    return plan(model, load_rules(rules, vars=vars, model_type=_model_type(model), model=model), source=source)
