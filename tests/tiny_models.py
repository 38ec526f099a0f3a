"""Tiny random models of every family with built-in rules, built from configs in code (no hub).

Sizes are the smallest that still exercise each family's structure (shared experts, dense first layers,
MLA attention, GPT-OSS's biased transposed experts and sliding window).
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)

CONFIGS: dict[str, dict] = {
    "qwen3_moe": dict(
        COMMON,
        num_hidden_layers=3,
        head_dim=8,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
    ),
    "qwen2_moe": dict(
        COMMON,
        num_hidden_layers=2,
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
    ),
    "mixtral": dict(COMMON, num_hidden_layers=2, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(
        COMMON,
        num_hidden_layers=3,
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        num_key_value_heads=4,
    ),
    "glm4_moe": dict(
        COMMON,
        num_hidden_layers=2,
        head_dim=8,
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        partial_rotary_factor=0.5,
    ),
    "gpt_oss": dict(
        COMMON,
        num_hidden_layers=2,
        head_dim=8,
        intermediate_size=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "llama": dict(COMMON, num_hidden_layers=2, intermediate_size=48),
}

FAMILIES = tuple(CONFIGS)


def tiny_config(family: str, **overrides) -> PretrainedConfig:
    config = AutoConfig.for_model(family, **{**CONFIGS[family], **overrides})
    config._attn_implementation = "eager"
    return config


def tiny_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    """A random-weight model in eval mode. Router/expert weights get a larger scale so routing is not a tie."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 or "bias" in name:
                param.normal_(0.0, 0.2)
            if name.endswith("e_score_correction_bias"):
                param.zero_()
    model.generation_config.pad_token_id = 0
    return model.eval()


def twin(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy with the same weights (one stays plain, the other is optimized)."""
    return copy.deepcopy(model)
