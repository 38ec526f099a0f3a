"""Tiny configs, in code, for every transformers model type whose modeling file defines a routed-experts module.

``TINY_CONFIGS[model_type]()`` returns ``(config, auto_class)``: a config small enough that building the model
and running a forward takes well under a second on one core (2 layers, hidden 64, 8 experts of 32, vocab 128,
vision/audio towers of one layer), and the Auto class that builds what a user would load for that model type
(``AutoModelForCausalLM``, or ``AutoModelForImageTextToText`` for a VLM whose language model holds the experts).
The config names that model's class in ``architectures``, as a checkpoint's config.json does, so
``ktinject.from_pretrained`` builds the same class from it.

Every family starts from the same text sizes (``TEXT``, applied only to the keys the family's config has) and
adds what its architecture needs: MLA ranks, every layer sparse, at least one attention layer in hybrid
models, and sub-configs shrunk to match. ``tiny_model`` builds the random-float32 model the family tests use.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForTokenClassification,
    PretrainedConfig,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# Sizes every text config gets when it has the key (hidden 64, 8 experts of 32, top-2, vocab 128).
TEXT: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=64,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    num_experts=8,
    num_local_experts=8,
    n_routed_experts=8,
    moe_num_experts=8,
    num_experts_per_tok=2,
    shared_expert_intermediate_size=32,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=0,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    decoder_sparse_step=1,
    mlp_only_layers=[],
)
# Multi-head latent attention (DeepSeek-V2/V3 style): K and V heads are the query heads.
MLA: dict[str, Any] = dict(
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    head_dim=8,
)
# Sparse-attention indexers (DeepSeek-V3.2 / GLM-MoE-DSA style).
INDEXER: dict[str, Any] = dict(index_topk=8, index_head_dim=16, index_n_heads=2)
# Vision/audio towers: one small layer; keys applied only where the sub-config has them.
TOWER: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    depth=1,
    num_heads=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    patch_size=4,
    image_size=16,
    encoder_layers=1,
    encoder_attention_heads=2,
    encoder_ffn_dim=64,
    d_model=32,
    n_layers=1,
    vocab_size=128,
    output_channels=16,
    downsample_channels=[16, 32],
    mlp_dim=64,
    global_attn_indexes=[0],
    window_size=2,
)

CausalLM = AutoModelForCausalLM
ImageTextToText = AutoModelForImageTextToText
TokenClassification = AutoModelForTokenClassification


@dataclasses.dataclass(frozen=True)
class Family:
    """How to shrink one model type: overrides on top of ``TEXT``/``TOWER`` and the Auto class to build it."""

    model_type: str
    auto: type = CausalLM
    text: dict[str, Any] = dataclasses.field(default_factory=dict)  # the language model's config
    subs: dict[str, Any] = dataclasses.field(default_factory=dict)  # other sub-configs (vision_config...), nested
    top: dict[str, Any] = dataclasses.field(default_factory=dict)  # top-level keys of a composite config
    text_key: str = "text_config"  # where a composite config keeps its language model's config (dotted path)
    mla: bool = False
    sparse: str | None = None  # value for every entry of mlp_layer_types (None: the key is not set)
    generates: bool = True  # greedy generate() is token-by-token decoding (False: a token classifier, a diffusion LM)


def _fit(defaults: dict[str, Any], table: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in table.items() if k in defaults}


def _text_kwargs(family: Family, defaults: dict[str, Any]) -> dict[str, Any]:
    kwargs = _fit(defaults, TEXT)
    if family.mla:
        kwargs.update(MLA)
        kwargs.update(_fit(defaults, INDEXER))
    layers = family.text.get("num_hidden_layers", TEXT["num_hidden_layers"])
    if family.sparse is not None:
        kwargs["mlp_layer_types"] = [family.sparse] * layers
    kwargs.update(family.text)
    return kwargs


def _tower_kwargs(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A vision/audio sub-config shrunk with ``TOWER`` (nested sub-configs too), then ``overrides`` (deep)."""
    kwargs = _fit(defaults, TOWER)
    for key, value in defaults.items():
        if isinstance(value, dict) and "model_type" in value:
            kwargs[key] = _tower_kwargs(value, overrides.get(key, {}))
    kwargs.update({k: v for k, v in overrides.items() if not (isinstance(v, dict) and k in kwargs)})
    return kwargs


def _composite_kwargs(family: Family, defaults: dict[str, Any], path: str) -> dict[str, Any]:
    """Keyword arguments for a composite config: the language model's sub-config gets ``TEXT``, every other
    sub-config (vision, audio, nested ones) ``TOWER``; ``family.subs`` is keyed by dotted path."""
    kwargs: dict[str, Any] = {}
    for key, value in defaults.items():
        if not (isinstance(value, dict) and "model_type" in value):
            continue
        where = path + key
        if where == family.text_key:
            kwargs[key] = _text_kwargs(family, value)
        elif family.text_key.startswith(where + "."):
            kwargs[key] = {**_composite_kwargs(family, value, where + "."), **family.subs.get(where, {})}
        else:
            kwargs[key] = _tower_kwargs(value, family.subs.get(where, {}))
    return kwargs


def build(family: Family) -> tuple[PretrainedConfig, type]:
    """The tiny config of ``family`` and its Auto class."""
    config_class = CONFIG_MAPPING[family.model_type]
    defaults = config_class().to_dict()
    if isinstance(defaults.get(family.text_key.split(".")[0]), dict):
        config = config_class(**_composite_kwargs(family, defaults, ""), **family.top)
    else:
        config = config_class(**_text_kwargs(family, defaults), **family.top)
    config._attn_implementation = "eager"
    mapping = family.auto._model_mapping
    if type(config) in mapping:
        config.architectures = [mapping[type(config)].__name__]
    return config, family.auto


def _rope(**extra: Any) -> dict[str, Any]:
    return dict(rope_type="default", rope_theta=1e4, **extra)


_SWA = dict(swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16)

FAMILIES: list[Family] = [
    Family("afmoe", text=dict(num_dense_layers=0, global_attn_every_n_layers=2)),
    Family("aria", ImageTextToText, text=dict(moe_topk=2)),
    Family("axk1", mla=True, sparse="sparse"),
    Family("axk2", mla=True, sparse="sparse"),
    Family(
        "bailing_hybrid",
        mla=True,
        sparse="sparse",
        text=dict(num_experts_per_token=2, num_expert_group=1, layer_group_size=2),
    ),
    Family("beam", sparse="sparse"),
    Family("cohere2_moe"),
    Family("deepseek_ocr2", ImageTextToText, sparse="sparse"),
    Family("deepseek_v2", mla=True),
    Family("deepseek_v3", mla=True),
    Family("deepseek_v32", mla=True, sparse="sparse"),
    Family("deepseek_v4", sparse="moe"),
    # A block-diffusion LM: its generate() denoises canvases instead of decoding token by token.
    Family(
        "diffusion_gemma",
        ImageTextToText,
        generates=False,
        text=dict(top_k_experts=2, per_layer_config={}),
        top=dict(canvas_length=4),
    ),
    Family("dots1", text=dict(n_shared_experts=1)),
    Family(
        "dots3_note",
        ImageTextToText,
        mla=True,
        sparse="sparse",
        text=dict(per_layer_config={}),
        subs={
            # The vision tower has routed experts of its own.
            "vision_config": dict(
                per_layer_config={},
                adapter_in_dim=32,
                adapter_out_dim=64,
                mlp_layer_types=["sparse"],
                num_local_experts=4,
                moe_intermediate_size=32,
            ),
            "audio_config": dict(
                adapter_input_size=32, adapter_out_dim=64, conv_output_size=64, downsample_hidden_size=16
            ),
        },
    ),
    Family("ernie4_5_moe", text=dict(moe_k=2, moe_layer_start_index=0, moe_num_shared_experts=1)),
    Family(
        "ernie4_5_vl_moe",
        ImageTextToText,
        sparse="sparse",
        text=dict(moe_k=2, moe_intermediate_size=[32, 32], rope_parameters=_rope(mrope_section=[3, 3, 2])),
    ),
    Family("exaone_moe", sparse="sparse"),
    Family("flex_olmo"),
    Family("flint"),
    Family(
        "gemma4",
        ImageTextToText,
        text=dict(
            enable_moe_block=True,
            top_k_experts=2,
            per_layer_config={},
            vocab_size_per_layer_input=128,
            hidden_size_per_layer_input=16,
        ),
    ),
    Family("glm4_moe"),
    Family("glm4_moe_lite", mla=True, sparse="sparse"),
    Family(
        "glm4v_moe",
        ImageTextToText,
        text=dict(rope_parameters=_rope(partial_rotary_factor=0.5, mrope_section=[2, 1, 1])),
        subs={"vision_config": dict(out_hidden_size=64)},
    ),
    Family(
        "glm5_next",
        ImageTextToText,
        mla=True,
        sparse="sparse",
        text=dict(
            index_kpool=4,
            linear_head_dim=16,
            linear_num_heads=4,
            qk_rope_head_dim=0,
            qk_nope_head_dim=16,
            layer_types=["linear_attention", "indexed_attention"],
        ),
        subs={"vision_config": dict(out_hidden_size=64, projection_intermediate_size=64)},
    ),
    Family("glm_moe_dsa", mla=True, sparse="sparse"),
    Family("gpt_oss"),
    Family("granitemoe"),
    Family("granitemoe_swa"),
    Family(
        "granitemoehybrid",
        text=dict(
            layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, mamba_chunk_size=16
        ),
    ),
    Family("granitemoeshared"),
    Family("hunyuan_v1_moe", text=dict(moe_topk=2)),
    Family("hy_v3", sparse="sparse"),
    Family("hy_v4", mla=True, sparse="sparse"),
    Family(
        "hy_v4_vl",
        ImageTextToText,
        mla=True,
        sparse="sparse",
        text=dict(rope_parameters=_rope(mrope_section=[2, 1, 1])),
        subs={"vision_config": dict(out_hidden_size=64, max_image_size=64)},
    ),
    Family(
        "inkling_mm_model",
        ImageTextToText,
        sparse="sparse",
        text=dict(_SWA, intermediate_size=64, n_shared_experts=1),
        subs={
            "vision_config": dict(text_hidden_size=64),
            "audio_config": dict(text_hidden_size=64, n_mel_bins=8, mel_vocab_size=16),
        },
    ),
    Family(
        "inkling2",
        ImageTextToText,
        text=dict(_SWA, unpadded_vocab_size=128),
        subs={"vision_config": dict(text_hidden_size=64, projection_hidden_dim=64)},
    ),
    Family(
        "inkling2_loop",
        ImageTextToText,
        text=dict(
            _SWA,
            unpadded_vocab_size=128,
            n_layers_per_attn_res_block=1,
            loop_layer_index_start=1,
            loop_layer_index_end=2,
        ),
        subs={"vision_config": dict(text_hidden_size=64, projection_hidden_dim=64)},
    ),
    Family("jamba", text=dict(expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1)),
    Family(
        "kimi_linear",
        mla=True,
        sparse="sparse",
        text=dict(
            num_experts_per_token=2,
            linear_head_dim=16,
            linear_num_heads=4,
            layer_types=["linear_attention", "full_attention"],
        ),
    ),
    Family("kolibri1"),
    Family("laguna", sparse="sparse"),
    Family("lara_mini"),
    Family("lfm2_moe", text=dict(num_dense_layers=0, layer_types=["conv", "full_attention"])),
    # The VLM wrapper (AutoModelForImageTextToText) fails a text-only forward in transformers 5.24 ("no attribute
    # image_outputs"); the causal LM is what runs.
    Family("llama4", CausalLM),
    Family(
        "longcat_flash",
        mla=True,
        text=dict(num_layers=1, moe_topk=2, zero_expert_num=2, expert_ffn_hidden_size=32, ffn_hidden_size=64),
    ),
    Family("mellum"),
    Family("mimo_v2_flash", sparse="sparse"),
    Family("minimax"),
    Family("minimax_m2"),
    Family("minimax_m3_vl", ImageTextToText),
    Family(
        "mistral4",
        ImageTextToText,
        mla=True,
        text=dict(
            head_dim=16,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=1e4,
                factor=4.0,
                original_max_position_embeddings=64,
                max_position_embeddings=256,
                beta_fast=32.0,
                beta_slow=1.0,
                mscale_all_dim=1.0,
                mscale=1.0,
                llama_4_scaling_beta=0.1,
            ),
        ),
    ),
    Family("mistral_large4", ImageTextToText, mla=True, sparse="sparse"),
    Family("mixtral"),
    Family(
        "muse_spark",
        ImageTextToText,
        text=dict(moe_hidden_size=64),
        top=dict(out_hidden_size=64, projector_hidden_size=64),
        subs={"audio_config": dict(patch_sizes=[16], hidden_sizes=[32], depths=[1], out_hidden_size=64)},
    ),
    Family(
        "nemotron_h",
        text=dict(
            layers_block_type=["linear_attention", "moe", "full_attention", "moe"],
            mamba_num_heads=4,
            mamba_head_dim=16,
            ssm_state_size=16,
            n_groups=1,
            chunk_size=16,
            moe_shared_expert_intermediate_size=32,
        ),
    ),
    Family("olmoe"),
    Family("openai_privacy_filter", TokenClassification, generates=False),
    Family("phimoe"),
    Family("qwen2_moe"),
    Family("qwen3_5_moe", ImageTextToText, text=dict(layer_types=["linear_attention", "full_attention"])),
    Family("qwen3_moe"),
    Family("qwen3_next", text=dict(layer_types=["linear_attention", "full_attention"])),
    # Qwen3-Omni's top-level model has no forward (generate() runs the thinker, then the talker for audio): the
    # thinker is the language model. Its generate() reads vision_start_token_id, which only the talker's config
    # sets in transformers 5.24.
    Family(
        "qwen3_omni_moe_thinker",
        ImageTextToText,
        top=dict(vision_start_token_id=127),
        subs={
            "vision_config": dict(out_hidden_size=64),
            "audio_config": dict(output_dim=64, downsample_hidden_size=16),
        },
    ),
    Family("qwen3_vl_moe", ImageTextToText, subs={"vision_config": dict(out_hidden_size=64)}),
    Family(
        "qwen4_exp",
        ImageTextToText,
        text=dict(
            layer_types=["linear_attention", "indexed_attention"],
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            hc_lowrank=16,
            ple_embed_dim=16,
            indexer_n_heads=2,
            indexer_kv_heads=1,
            indexer_head_dim=16,
            indexer_budget=16,
            indexer_compress_ratio=4,
        ),
        subs={"vision_config": dict(out_hidden_size=64)},
    ),
    Family("solar_open"),
    # Layer 0's experts clamp at 7 (as Step-3.7-Flash's last layers do), layer 1's do not.
    Family(
        "step3p7",
        ImageTextToText,
        sparse="sparse",
        text=dict(sliding_window=8, share_expert_dim=32, num_sliding_attention_heads=4, swiglu_limits=[7.0, 0.0]),
    ),
    Family("unlimited_ocr", ImageTextToText, mla=True, sparse="sparse"),
    Family("zaya", text=dict(num_experts_per_tok=1)),
    # transformers 5.24's DBRX reads attn_config.rope_theta (not a default) and cannot run clip_qkv=None.
    Family(
        "dbrx",
        text=dict(
            d_model=64,
            n_heads=4,
            n_layers=2,
            max_seq_len=256,
            attn_config=dict(kv_n_heads=2, rope_theta=1e4, clip_qkv=8.0),
            ffn_config=dict(hidden_size=64, ffn_hidden_size=32, moe_num_experts=8, moe_top_k=2),
        ),
    ),
    Family("jetmoe"),
]

TINY_CONFIGS: dict[str, Callable[[], tuple[PretrainedConfig, type]]] = {
    f.model_type: functools.partial(build, f) for f in FAMILIES
}
BY_MODEL_TYPE: dict[str, Family] = {f.model_type: f for f in FAMILIES}


def tiny_model(model_type: str, *, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random-float32 model of ``model_type`` in eval mode (matrices and biases ~ N(0, 0.2), so routing is
    not a tie and logits are not flat; score-correction biases zero, like a fresh checkpoint). ``overrides``
    set top-level config attributes (``tie_word_embeddings=True``)."""
    config, auto = TINY_CONFIGS[model_type]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = auto.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 or name.endswith("bias"):
                param.normal_(0.0, 0.2)
            if name.endswith("e_score_correction_bias"):
                param.zero_()
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = 0
    return model.eval()
