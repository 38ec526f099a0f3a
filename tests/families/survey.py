"""Survey of every transformers family with routed experts: what the experts look like and where they sit.

``scan_experts_classes()`` reads the installed transformers' modeling files (as text, nothing imported) for
experts classes: those decorated with ``@use_experts_implementation`` and the undecorated ``*Experts``
classes holding stacked expert weights. ``survey_family(model_type)`` builds the family's tiny model
(``ktinject.families.tiny``) and records, for every experts module ``looks_like_experts`` finds, its path, class,
flags, tensors, the layout ``experts_spec`` reads and what ``cpu_experts`` would still need, plus whether
plain HF forward/generate runs and which cache it uses. Run this file to rewrite ``catalogue.md``::

    python tests/families/survey.py
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import transformers
from ktinject.operators.cpu_experts import SUPPORTED_FEATURES
from ktinject.operators.experts_layout import ALL_FEATURES, experts_spec, looks_like_experts
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ktinject.errors import OperatorError
from ktinject.families.scan import ExpertsClass, model_dir_of, scan_experts_classes
from ktinject.families.tiny import BY_MODEL_TYPE, TINY_CONFIGS, tiny_model

_FLAGS = ("is_concatenated", "is_transposed", "has_bias", "has_gate", "has_post_expert_norm")


@dataclasses.dataclass
class ExpertsRecord:
    path: str
    class_name: str
    flags: dict[str, bool]  # the decorator's flags as set on the instance ({} when undecorated)
    tensors: dict[str, tuple[int, ...]]
    layout: str  # ExpertsSpec.describe(), or the OperatorError's text
    cpu_missing: list[str]  # features cpu_experts lacks today
    block: str  # class of the module holding the experts, and its other children


@dataclasses.dataclass
class FamilyRecord:
    model_type: str
    auto_class: str
    model_class: str
    experts: list[ExpertsRecord]
    forward: str  # "ok" or the error
    generate: str  # "ok", "n/a" or the error
    cache: str
    routing: str  # full-size routing facts from the default config


def _routing_facts(model_type: str) -> str:
    """Experts/top-k/groups/shared experts of the full-size default config (what real checkpoints look like)."""
    defaults = CONFIG_MAPPING[model_type]().to_dict()
    text = defaults.get("text_config") or defaults.get("thinker_config", {}).get("text_config") or defaults
    text = {**text, **text.get("ffn_config", {})} if isinstance(text.get("ffn_config"), dict) else text
    keys = {
        "experts": ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts"),
        "top_k": ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k_experts", "moe_top_k"),
        "groups": ("n_group", "num_expert_group"),
        "topk_group": ("topk_group",),
        "shared": ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"),
        "shared_size": ("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size", "share_expert_dim"),
        "identity": ("zero_expert_num",),
        "scale": ("routed_scaling_factor",),
    }
    facts = []
    for label, names in keys.items():
        value = next((text[n] for n in names if text.get(n) not in (None, 0, [])), None)
        if value is not None and not (label in ("groups", "topk_group", "scale") and value == 1):
            facts.append(f"{label}={value}")
    return ", ".join(facts)


def _experts_record(path: str, module: torch.nn.Module, parent: torch.nn.Module) -> ExpertsRecord:
    flags = {f: bool(getattr(module, f)) for f in _FLAGS if hasattr(module, f)}
    tensors = {n: tuple(t.shape) for n, t in module.state_dict().items()}
    try:
        spec = experts_spec(module, name=path, supports=ALL_FEATURES)
        layout, missing = spec.describe(), sorted(spec.features - SUPPORTED_FEATURES)
    except OperatorError as exc:
        layout, missing = f"not described: {exc}", ["layout"]
    leaf = path.rpartition(".")[2]
    others = [n for n, _ in parent.named_children() if n != leaf]
    return ExpertsRecord(
        path, type(module).__name__, flags, tensors, layout, missing, f"{type(parent).__name__}({', '.join(others)})"
    )


def survey_family(model_type: str) -> FamilyRecord:
    """Build the tiny model of ``model_type`` and describe its experts and how plain HF runs it."""
    family = BY_MODEL_TYPE[model_type]
    _, auto = TINY_CONFIGS[model_type]()
    model = tiny_model(model_type)
    modules = dict(model.named_modules())
    experts = [
        _experts_record(name, m, modules[name.rpartition(".")[0]])
        for name, m in modules.items()
        if looks_like_experts(m)
    ]
    ids = torch.arange(3, 9)[None]
    cache = "-"
    try:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True) if family.generates else model(input_ids=ids)
        forward = "ok"
        past = getattr(out, "past_key_values", None)
        cache = type(past).__name__ if past is not None else "-"
        if past is not None and hasattr(past, "layers"):
            kinds = sorted({type(layer).__name__ for layer in past.layers})
            cache += f" [{', '.join(kinds)}]"
    except Exception as exc:  # noqa: BLE001 - recorded, not raised: this is a survey
        forward = f"{type(exc).__name__}: {exc}"
    generate = "n/a"
    if family.generates:
        try:
            with torch.no_grad():
                model.generate(ids, max_new_tokens=2, do_sample=False)
            generate = "ok"
        except Exception as exc:  # noqa: BLE001
            generate = f"{type(exc).__name__}: {exc}"
    return FamilyRecord(
        model_type, auto.__name__, type(model).__name__, experts, forward, generate, cache, _routing_facts(model_type)
    )


# ---- the catalogue ---------------------------------------------------------------------------------

# What the table cannot show. Keyed by model type.
NOTES: dict[str, str] = {
    "dbrx": "experts hold flat `mlp.w1`/`mlp.v1`/`mlp.w2` [E*I, H] in a child module (w2 = down transposed); called "
    "with hidden [B, S, H] and return that shape; transformers 5.24 needs attn_config.rope_theta and a "
    "clip_qkv to run at all",
    "jetmoe": "no experts module: JetMoeMoE routes itself and calls two JetMoeParallelExperts linears "
    "(input_linear [E, 2I, H], output_linear [E, H, I]) on expert-sorted rows; attention is a mixture "
    "of experts too (JetMoeMoA); needs a block-level operator",
    "llama4": "experts called dense: `experts(hidden[E*T, H])`, each expert on its own T rows, the router score "
    "multiplies the expert's *input* (Llama4TextMoe repeats every token E times); the VLM wrapper's "
    "text-only forward fails in transformers 5.24, so the causal LM is built",
    "longcat_flash": "identity (zero-compute) experts: ids >= n_routed_experts return their input times the weight; "
    "gate_up_proj has n_routed+zero_expert_num rows (the extra ones unused), down_proj n_routed",
    "muse_spark": "post-expert norm (input-scaled RMSNorm) on each expert's output before the routing weight; the "
    "experts run at moe_hidden_size between pre/post projections of the MoE block",
    "nemotron_h": "experts not gated (`up_proj`, relu2); the MoE block may project into a latent (moe_latent_size) "
    "before the experts; experts sit in `mixer` of the 'moe' layers",
    "ernie4_5_vl_moe": "two experts modules per layer: `mlp.text_moe.experts` and `mlp.vision_moe.experts` "
    "(own intermediate sizes; tokens split by modality)",
    "dots3_note": "the vision tower has routed experts too (`model.vision_tower.blocks.N.mlp.experts`)",
    "diffusion_gemma": "block-diffusion LM: experts in the encoder's language model and in the decoder "
    "(`layers.N.experts`, no `mlp`); generate() denoises canvases",
    "gemma4": "experts at `layers.N.experts` (no `mlp`), beside a dense MLP in the same layer",
    "qwen3_omni_moe_thinker": "Qwen3-Omni (`qwen3_omni_moe`) has no forward of its own: generate() runs this thinker, "
    "then the talker (Qwen3OmniMoeTalkerTextExperts, same layout) for audio",
    "inkling_mm_model": "InklingSharedExperts (`mlp.shared_experts`) is named *Experts but is the always-on shared "
    "experts, called as (hidden, gammas): not a routed experts module",
    "openai_privacy_filter": "token classifier (no generate); accumulates experts in float32",
    "gpt_oss": "forward keyword names are router_indices/routing_weights (call positionally)",
    "beam": "gate math in float32 (same result in float32 models)",
    "inkling2": "gate math and accumulation in float32",
    "inkling2_loop": "gate math and accumulation in float32; layers loop",
    "step3p7": "the clamp (swiglu_limits, per layer) is applied after silu; a 0 limit means none",
    "zaya": "top-1 routing only (ZAYA rejects num_experts_per_tok > 1); router is an MLP",
    "granitemoe": "experts at `block_sparse_moe.experts`",
    "granitemoe_swa": "experts at `block_sparse_moe.experts`",
    "granitemoeshared": "experts at `block_sparse_moe.experts`, shared MLP beside it",
    "granitemoehybrid": "experts at `block_sparse_moe.experts`; Mamba-2 layers",
    "jamba": "experts at `feed_forward.experts`; Mamba layers",
    "lfm2_moe": "experts at `feed_forward.experts`; short-conv layers",
}


def _cell(text: str, limit: int = 90) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render(records: list[FamilyRecord], classes: list[ExpertsClass]) -> str:
    """The catalogue as markdown."""
    lines = [
        "# Routed-experts families in transformers " + transformers.__version__,
        "",
        "Generated by `python tests/families/survey.py` from the tiny configs in `ktinject/families/tiny.py`",
        "(random float32 weights). *layout* is what `experts_spec` reads; *cpu_experts lacks* lists the features",
        "of that layout the C++ operator does not implement today (empty: it runs there). Paths are those of the",
        "tiny model (2 layers); *routing* is the full-size default config's.",
        "",
        "| model type | Auto class → model | experts path(s) | class | layout | cpu_experts lacks | HF fwd / gen | cache | routing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        paths = sorted({_generic(e.path) for e in r.experts}) or ["(none)"]
        layouts = sorted({e.layout for e in r.experts}) or ["-"]
        lacks = sorted({m for e in r.experts for m in e.cpu_missing}) or ([] if r.experts else ["experts module"])
        classes_here = sorted({e.class_name for e in r.experts}) or ["-"]
        status = f"{_short(r.forward)} / {_short(r.generate)}"
        lines.append(
            f"| {r.model_type} | {r.auto_class.removeprefix('AutoModelFor')} → {r.model_class} | {'<br>'.join(paths)} | "
            f"{'<br>'.join(classes_here)} | {_cell('; '.join(layouts), 120)} | {', '.join(lacks)} | {status} | "
            f"{_cell(r.cache, 60)} | {_cell(r.routing)} |"
        )
    lines += ["", "## Experts tensors and MoE blocks", ""]
    for r in records:
        seen = set()
        for e in r.experts:
            key = (_generic(e.path), e.class_name)
            if key in seen:
                continue
            seen.add(key)
            tensors = ", ".join(f"`{n}` {list(s)}" for n, s in e.tensors.items())
            flags = ", ".join(f"{k}={int(v)}" for k, v in e.flags.items()) or "undecorated"
            lines.append(f"- **{r.model_type}** `{key[0]}` {e.class_name} ({flags}): {tensors}; in {e.block}")
    lines += ["", "## Notes", ""]
    lines += [f"- **{k}**: {v}" for k, v in NOTES.items()]
    lines += ["", "## Experts classes found in the modeling files", ""]
    covered = {model_dir_of(r.model_type) for r in records}
    for c in classes:
        mark = "" if c.model_dir in covered else " **(no tiny config)**"
        lines.append(f"- `{c.model_dir}`: {c.class_name} — {c.decorator or 'undecorated'}{mark}")
    return "\n".join(lines) + "\n"


def _generic(path: str) -> str:
    """``model.layers.3.mlp.experts`` -> ``model.layers.N.mlp.experts``."""
    return ".".join("N" if part.isdigit() else part for part in path.split("."))


def _short(status: str) -> str:
    return status if status in ("ok", "n/a") else "FAIL: " + _cell(status, 60)


def main() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    records = [survey_family(mt) for mt in TINY_CONFIGS]
    out = Path(__file__).with_name("catalogue.md")
    out.write_text(render(records, scan_experts_classes()), encoding="utf-8")
    print(f"wrote {out} ({len(records)} families)")


if __name__ == "__main__":
    main()
