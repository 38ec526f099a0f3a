"""Per model type: which rules ``auto`` uses and whether ktinject runs the family (``ktinject families``).

``static_status`` needs no weights: the family's tiny config is built on the meta device with the builder
``from_pretrained`` uses, ``rules="auto"`` (with ``gpu=cpu``) is planned on it, and every experts module must
be claimed by ``cpu_experts``; a layout it cannot run is the plan-time OperatorError that names module and
feature. ``verify`` runs the parity check the test suite runs: a tiny random float32 model, optimized in place
with ``auto``, against plain transformers: logits within 1e-4, the same 8 greedy tokens.

``KNOWN_LIMITS`` holds the families ktinject cannot run, with the reason it prints; the tests expect exactly
these to fail, so a family that starts to work (or stops) is noticed.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ktinject.errors import KtInjectError

CPU_VARS = {"gpu": "cpu"}
TOLERANCE = 1e-4  # logits, absolute (float32 everywhere; only summation order differs)
NEW_TOKENS = 8

# model type -> why ktinject does not run it (one line, printed by `ktinject families`).
KNOWN_LIMITS: dict[str, str] = {
    "jetmoe": "no experts module: JetMoeMoE routes inside the block and calls two JetMoeParallelExperts linears on "
    "expert-sorted rows (needs a block-level operator)",
    "openai_privacy_filter": "a token classifier (OpenAIPrivacyFilterForTokenClassification): transformers builds no "
    "causal LM from its config, and ktinject runs text generators",
}


@dataclasses.dataclass(frozen=True)
class FamilyStatus:
    """One row of ``ktinject families``."""

    model_type: str
    model_class: str  # what from_pretrained builds ("-" when nothing)
    rules: str  # "built-in <name>", "generic MoE", "generic dense" or "-"
    experts: int  # experts modules cpu_experts replaces in the tiny model
    status: str  # "plans" (static check passed), "verified", "unsupported", "failed"
    reason: str = ""  # why unsupported / failed; for verified, what was compared
    paths: tuple[str, ...] = ()  # where the experts sit, layer numbers as N (model.layers.N.mlp.experts)

    @property
    def ok(self) -> bool:
        return self.status in ("plans", "verified")


def _rules_label(origin: str, name: str | None) -> str:
    if name is None:
        return "-"
    if name == "base/moe" and "generic" in origin:
        return "generic MoE"
    if name == "base/dense" and "generic" in origin:
        return "generic dense"
    return f"built-in {name}"


def static_status(model_type: str) -> FamilyStatus:
    """Plan ``rules="auto"`` on the family's tiny model built on meta (no weights, a fraction of a second)."""
    from ktinject.families.model_class import auto_model_class
    from ktinject.families.tiny import TINY_CONFIGS
    from ktinject.injection import plan_for
    from ktinject.loading.model import build_meta_model
    from ktinject.operators.experts_layout import looks_like_experts
    from ktinject.rules.auto import choose_auto_rules

    config, _ = TINY_CONFIGS[model_type]()
    try:
        model_class = auto_model_class(config)._model_mapping[type(config)].__name__
    except KtInjectError as exc:
        return FamilyStatus(model_type, "-", "-", 0, "unsupported", KNOWN_LIMITS.get(model_type, str(exc)))
    model = build_meta_model(config, torch.float32)
    choice = choose_auto_rules(getattr(config, "model_type", None), model)
    rules = _rules_label(choice.reason, choice.name)
    experts = [name for name, module in model.named_modules() if looks_like_experts(module)]
    paths = tuple(sorted({".".join("N" if part.isdigit() else part for part in name.split(".")) for name in experts}))
    if model_type in KNOWN_LIMITS:
        return FamilyStatus(model_type, model_class, rules, 0, "unsupported", KNOWN_LIMITS[model_type], paths)
    try:
        with _quiet():
            p = plan_for(model, "auto", vars=CPU_VARS)
    except KtInjectError as exc:
        return FamilyStatus(model_type, model_class, rules, 0, "unsupported", str(exc), paths)
    # Experts in cpu_experts, on their own or as the experts part of a whole decoder layer (cpu_decoder_layer).
    layers = tuple(e.module_name + "." for e in p if e.op == "decoder_layer")
    on_cpu = {e.module_name for e in p if e.op == "cpu_experts"} | {n for n in experts if n.startswith(layers)}
    missed = [name for name in experts if name not in on_cpu]
    if not experts or missed:
        what = f"experts module {missed[0]!r} is not claimed by cpu_experts" if missed else "no experts module found"
        return FamilyStatus(model_type, model_class, rules, len(on_cpu), "unsupported", what, paths)
    return FamilyStatus(model_type, model_class, rules, len(on_cpu), "plans", "", paths)


@dataclasses.dataclass(frozen=True)
class Parity:
    """What ``verify_parity`` measured."""

    max_logit_error: float
    same_tokens: bool | None  # None: the family does not decode token by token (not compared)
    experts_on_cpu: int


def verify_parity(model_type: str, *, seed: int = 0) -> Parity:
    """The tiny random float32 model of ``model_type``, optimized with ``rules="auto"`` (``gpu=cpu``), against
    plain transformers. Raises KtInjectError when ktinject cannot run it; the caller judges the numbers."""
    from ktinject.families.tiny import BY_MODEL_TYPE, tiny_model
    from ktinject.injection import optimize
    from ktinject.operators.cpu_experts import CpuExperts
    from ktinject.operators.experts_layout import looks_like_experts

    model = tiny_model(model_type, seed=seed)
    generates = BY_MODEL_TYPE[model_type].generates
    ids = torch.arange(3, 11)[None]
    with torch.no_grad():
        torch.manual_seed(0)  # DiffusionGemma's forward draws noise
        expected_logits = model(input_ids=ids).logits
        expected_tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False) if generates else None
    with _quiet():
        optimize(model, "auto", vars=CPU_VARS)
    left = [name for name, m in model.named_modules() if looks_like_experts(m)]
    if left:
        raise KtInjectError(f"{model_type}: experts module {left[0]!r} was not replaced by cpu_experts")
    with torch.no_grad():
        torch.manual_seed(0)
        logits = model(input_ids=ids).logits
        tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False) if generates else None
    error = (logits - expected_logits).abs().max().item()
    same = None if tokens is None else bool(torch.equal(tokens, expected_tokens))
    return Parity(error, same, sum(isinstance(m, CpuExperts) for m in model.modules()))


def verified_status(model_type: str) -> FamilyStatus:
    """``static_status``, then ``verify_parity`` for a family that plans."""
    status = static_status(model_type)
    if not status.ok:
        return status
    try:
        parity = verify_parity(model_type)
    except KtInjectError as exc:
        return dataclasses.replace(status, status="failed", reason=str(exc))
    tokens = {None: "", True: f", same {NEW_TOKENS} greedy tokens"}.get(parity.same_tokens, ", greedy tokens differ")
    verdict = parity.max_logit_error <= TOLERANCE and parity.same_tokens is not False
    reason = f"max logit error {parity.max_logit_error:.1e}{tokens}"
    return dataclasses.replace(status, status="verified" if verdict else "failed", reason=reason)


class _quiet:
    """Planning logs its choice and warnings; the family table says the same in one row."""

    def __enter__(self) -> None:
        self._logger = logging.getLogger("ktinject")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self._logger.setLevel(self._level)
