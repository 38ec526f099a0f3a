"""The rule files shipped with ktinject, and ``rules="auto"``.

In a wheel they live in ``ktinject/builtin_rules/`` (CMake installs the repository's ``rules/`` there); in a
source checkout or editable install they are read from ``rules/`` next to the package.
"""

from __future__ import annotations

from pathlib import Path

from ktinject.errors import RuleError

_PACKAGE_DIR = Path(__file__).resolve().parent.parent

# config.model_type -> built-in rule file. Dense models that share Llama's module names use the dense file.
# Families not listed here get the generic rules (``rules/auto.py``): a family file is optional.
MODEL_TYPE_RULES: dict[str, str] = {
    "qwen3_moe": "qwen3_moe",
    "qwen2_moe": "qwen2_moe",
    "mixtral": "mixtral",
    "deepseek_v3": "deepseek_v3",
    "kimi_k2": "deepseek_v3",
    "glm4_moe": "glm4_moe",
    "gpt_oss": "gpt_oss",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
}


def builtin_rules_dir() -> Path:
    """The directory holding the shipped rule files."""
    for candidate in (_PACKAGE_DIR / "builtin_rules", _PACKAGE_DIR.parent / "rules"):
        if candidate.is_dir():
            return candidate
    raise RuleError("the built-in rule files are missing from this installation (reinstall ktinject)")


def is_builtin_rule_file(file: str) -> bool:
    """Whether ``file`` is one of the shipped rule files. Their rules are written for many families, so one
    that matches nothing in a given model (no shared experts, no dense MLP) is expected, not a mistake."""
    try:
        return Path(file).resolve().is_relative_to(builtin_rules_dir().resolve())
    except (OSError, RuleError):
        return False


def builtin_rule_names() -> list[str]:
    """Names accepted by ``load_rules``: paths under the rules directory without ``.yaml``."""
    root = builtin_rules_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def builtin_rule_path(name: str) -> Path | None:
    """The file for a built-in name (``qwen3_moe``, ``base/moe.yaml``...), or None."""
    if not name or len(name) > 255 or not name.isprintable():  # no built-in name is long or holds control characters
        return None
    try:
        root = builtin_rules_dir().resolve()
        candidate = (root / name).resolve()
        if candidate.suffix != ".yaml":
            candidate = candidate.with_name(candidate.name + ".yaml")
        if root not in candidate.parents or not candidate.is_file():
            return None
    except (RuleError, OSError, RuntimeError, ValueError):  # no rules directory, or a name the OS refuses
        return None
    return candidate


def rules_for_model_type(model_type: str) -> str:
    """The family's built-in rule file for ``config.model_type``. Without a model to look at, ``rules="auto"``
    can only go by the name; with one it falls back to the generic rules (``ktinject.rules.auto``)."""
    try:
        return MODEL_TYPE_RULES[model_type]
    except KeyError:
        known = ", ".join(sorted(MODEL_TYPE_RULES))
        raise RuleError(
            f"rules='auto': no built-in rules for model_type {model_type!r} (built-in: {known}) and no model "
            "to recognise its experts in (ktinject.plan/optimize/from_pretrained pass it); pass a rule file"
        ) from None
