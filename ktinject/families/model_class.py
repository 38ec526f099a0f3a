"""Which transformers Auto class builds a model for a config: the text generator ktinject runs.

A causal LM config is built with ``AutoModelForCausalLM``; a vision-language (or omni) model whose language
model holds the experts has no causal-LM entry for its config and is built with
``AutoModelForImageTextToText`` (Qwen3-VL-MoE, GLM-4.5V, ERNIE-4.5-VL, Qwen3-Omni's thinker ...). Some config
types have both (Qwen3.5-MoE: a text-only causal LM and the VLM): the class a checkpoint names in
``config.architectures`` wins, so its weight names are the model's; without it the causal LM is built.
"""

from __future__ import annotations

from ktinject.errors import KtInjectError

# Wrappers that cannot run a text-only forward in the installed transformers: the causal LM is built instead
# (transformers 5.24's Llama4ForConditionalGeneration reads image outputs that a text-only call lacks).
_TEXT_ONLY_BROKEN = frozenset({"Llama4ForConditionalGeneration"})


def _auto_classes() -> tuple[type, ...]:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForCausalLM, AutoModelForImageTextToText


def auto_model_class(config) -> type:
    """The Auto class (``AutoModelForCausalLM`` or ``AutoModelForImageTextToText``) to build ``config`` with.

    KtInjectError in one line when neither builds it (an encoder, a token classifier ...).
    """
    built = [
        (auto, auto._model_mapping[type(config)]) for auto in _auto_classes() if type(config) in auto._model_mapping
    ]
    if not built:
        model_type = getattr(config, "model_type", "?")
        raise KtInjectError(
            f"transformers builds no causal LM and no image-text-to-text model from a {model_type!r} config "
            f"({type(config).__name__}): ktinject runs text generators only"
        )
    named = set(getattr(config, "architectures", None) or ())
    for auto, model_class in built:
        if model_class.__name__ in named and model_class.__name__ not in _TEXT_ONLY_BROKEN:
            return auto
    return built[0][0]
