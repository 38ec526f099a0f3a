"""``auto_model_class``: which transformers Auto class ``from_pretrained`` and ``ktinject plan`` build a config with."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from ktinject.errors import KtInjectError
from ktinject.families.model_class import auto_model_class
from ktinject.families.tiny import TINY_CONFIGS


@pytest.mark.parametrize(
    "model_type",
    [
        "qwen3_vl_moe",
        "glm4v_moe",
        "ernie4_5_vl_moe",
        "qwen3_omni_moe_thinker",
        "mistral4",
        "qwen3_5_moe",
        "gemma4",
        "qwen3_moe",
        "llama4",
        "dbrx",
    ],
)
def test_the_tiny_configs_are_built_as_their_checkpoints_name(model_type):
    config, auto = TINY_CONFIGS[model_type]()
    built = auto_model_class(config)._model_mapping[type(config)]
    assert built is auto._model_mapping[type(config)]
    assert built.__name__ == config.architectures[0]


def test_a_vlm_config_without_a_causal_lm_class_builds_the_vlm():
    config, _ = TINY_CONFIGS["qwen3_vl_moe"]()
    config.architectures = None
    assert auto_model_class(config) is AutoModelForImageTextToText


def test_a_config_with_both_classes_builds_the_named_one_else_the_causal_lm():
    config, _ = TINY_CONFIGS["qwen3_5_moe"]()
    assert config.architectures == ["Qwen3_5MoeForConditionalGeneration"]
    assert auto_model_class(config) is AutoModelForImageTextToText
    config.architectures = None  # a config built in code: the text-only causal LM
    assert auto_model_class(config) is AutoModelForCausalLM
    config.architectures = ["Qwen3_5MoeForCausalLM"]
    assert auto_model_class(config) is AutoModelForCausalLM


def test_llama4_checkpoints_build_the_causal_lm():
    # Llama-4 checkpoints name the VLM, whose text-only forward fails in transformers 5.24.
    config, _ = TINY_CONFIGS["llama4"]()
    config.architectures = ["Llama4ForConditionalGeneration"]
    assert auto_model_class(config) is AutoModelForCausalLM


def test_a_model_type_that_is_no_text_generator_is_one_line():
    with pytest.raises(KtInjectError) as info:
        auto_model_class(AutoConfig.for_model("vit"))
    assert str(info.value) == (
        "transformers builds no causal LM and no image-text-to-text model from a 'vit' config "
        "(ViTConfig): ktinject runs text generators only"
    )
