"""``ktinject.from_pretrained`` with ``rules="auto"`` on composite and hybrid families and the call layouts
``cpu_experts`` maps in Python: vision-language wrappers built with the Auto class their checkpoint names,
hybrid-attention models generating with their own caches, and experts loaded from a safetensors checkpoint
(post-expert norm, identity experts, dense call, DBRX's flat storage).

Each tiny random float32 model is saved by transformers (its checkpoint format) and loaded back on meta ->
rules -> streamed weights; logits within 1e-4 and the same 8 greedy tokens as the original.
"""

from __future__ import annotations

import pytest
import torch
from ktinject.operators.cpu_experts import CpuExperts
from ktinject.operators.experts_layout import looks_like_experts
from transformers import AutoModelForImageTextToText

import ktinject
from ktinject.families.tiny import TINY_CONFIGS, tiny_model

IDS = torch.arange(3, 11)[None]
LOAD = dict(rules="auto", vars={"gpu": "cpu"}, dtype=torch.float32, progress=False)

VLM = ["qwen3_vl_moe", "glm4v_moe", "qwen3_omni_moe_thinker", "qwen3_5_moe", "muse_spark"]
HYBRID = ["qwen3_next", "jamba", "nemotron_h", "granitemoehybrid", "kimi_linear"]
LAYOUTS = ["longcat_flash", "dbrx", "llama4"]
NOT_LOADED = {
    "ernie4_5_vl_moe": "its checkpoints need transformers' Chunk and ErnieFuseAndSplitTextVisionExperts conversions, "
    "which ktinject's safetensors loader does not support",
}


def assert_same_model(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    experts = [m for m in loaded.modules() if isinstance(m, CpuExperts)]
    assert experts and not any(looks_like_experts(m) for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, original(input_ids=IDS).logits, rtol=0, atol=1e-4)
        kwargs = dict(max_new_tokens=8, do_sample=False)
        assert torch.equal(loaded.generate(IDS, **kwargs), original.generate(IDS, **kwargs))


@pytest.mark.parametrize(
    "model_type",
    [
        *VLM,
        *HYBRID,
        *LAYOUTS,
        *(pytest.param(mt, marks=pytest.mark.xfail(reason=reason, strict=True)) for mt, reason in NOT_LOADED.items()),
    ],
)
def test_from_pretrained_with_auto_rules(model_type, tmp_path):
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path)
    loaded = ktinject.from_pretrained(tmp_path, **LOAD)
    assert type(loaded) is type(model)
    assert_same_model(loaded, model)


def test_a_llama4_vlm_checkpoint_loads_as_its_causal_lm(tmp_path):
    """Llama-4 checkpoints are the VLM (``language_model.model.layers...``); its text-only forward fails in
    transformers 5.24, so ktinject builds the causal LM, which takes the language model's weights."""
    config, _ = TINY_CONFIGS["llama4"]()
    config.architectures = ["Llama4ForConditionalGeneration"]
    torch.manual_seed(0)
    vlm = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in vlm.parameters():
            param.normal_(0.0, 0.2)
    vlm.save_pretrained(tmp_path)
    loaded = ktinject.from_pretrained(tmp_path, **LOAD)
    assert type(loaded).__name__ == "Llama4ForCausalLM"
    assert_same_model(loaded, vlm.language_model)
