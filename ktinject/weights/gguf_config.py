"""A transformers config from GGUF metadata, for the families with built-in rules.

Used when ``from_pretrained`` gets only a GGUF file. llama.cpp's converter writes each HF hyperparameter to a
GGUF key (``{arch}.attention.head_count`` ...); here each family reads them back. One table per family,
no guessing: a key the family needs and the file lacks is a WeightError naming key and file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ktinject.errors import WeightError

Get = Callable[..., Any]  # get(key, default=...) -> value; "{arch}." is prepended


def _rope(get: Get, theta_default: float) -> dict[str, Any]:
    """``rope_parameters`` (transformers v5) from the ``rope.*`` keys."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", theta_default))}
    kind = get("rope.scaling.type", None)
    if kind in (None, "none", ""):
        return rope
    rope["rope_type"] = kind
    rope["factor"] = float(get("rope.scaling.factor", 1.0))
    original = get("rope.scaling.original_context_length", None)
    if original is not None:
        rope["original_max_position_embeddings"] = int(original)
    if kind == "yarn":
        rope["beta_fast"] = float(get("rope.scaling.yarn_beta_fast", 32.0))
        rope["beta_slow"] = float(get("rope.scaling.yarn_beta_slow", 1.0))
        log_mul = get("rope.scaling.yarn_log_multiplier", None)
        if log_mul is not None:  # llama.cpp writes 0.1 * mscale_all_dim
            rope["mscale"] = rope["mscale_all_dim"] = float(log_mul) / 0.1
    return rope


def _common(get: Get, *, theta_default: float = 10000.0) -> dict[str, Any]:
    heads = int(get("attention.head_count"))
    kv = get("attention.head_count_kv", heads)
    kv = max(kv) if isinstance(kv, list) else kv
    out = {
        "hidden_size": int(get("embedding_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv) or heads,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_parameters": _rope(get, theta_default),
    }
    if (ctx := get("context_length", None)) is not None:
        out["max_position_embeddings"] = int(ctx)
    if (ff := get("feed_forward_length", None)) is not None:
        out["intermediate_size"] = int(ff)
    return out


def _moe(get: Get, experts_key: str) -> dict[str, Any]:
    return {
        experts_key: int(get("expert_count")),
        "num_experts_per_tok": int(get("expert_used_count")),
    }


def _qwen3_moe(get: Get, tensors: set[str]) -> dict[str, Any]:
    d = _common(get, theta_default=1e6) | _moe(get, "num_experts")
    d |= {"moe_intermediate_size": int(get("expert_feed_forward_length")), "head_dim": int(get("attention.key_length")),
          "norm_topk_prob": bool(get("expert_weights_norm", True)), "mlp_only_layers": [], "decoder_sparse_step": 1}
    return d


def _qwen2_moe(get: Get, tensors: set[str]) -> dict[str, Any]:
    d = _common(get, theta_default=1e6) | _moe(get, "num_experts")
    d |= {"moe_intermediate_size": int(get("expert_feed_forward_length")),
          "shared_expert_intermediate_size": int(get("expert_shared_feed_forward_length")),
          "norm_topk_prob": bool(get("expert_weights_norm", False)), "mlp_only_layers": [], "decoder_sparse_step": 1}
    return d


def _llama_like(get: Get, tensors: set[str]) -> dict[str, Any]:
    d = _common(get)
    head_dim = get("attention.key_length", None) or get("rope.dimension_count", None)
    if head_dim:
        d["head_dim"] = int(head_dim)
    if int(get("expert_count", 0) or 0):
        d |= _moe(get, "num_local_experts")
        d["intermediate_size"] = int(get("expert_feed_forward_length", d.get("intermediate_size")))
    return d


def _deepseek(get: Get, tensors: set[str]) -> dict[str, Any]:
    d = _common(get) | _moe(get, "n_routed_experts")
    rope_dim = int(get("rope.dimension_count"))
    # MLA files converted for llama.cpp's absorbed attention say key_length_mla/value_length_mla and set
    # head_count_kv to 1; older files give the per-head sizes in key_length/value_length.
    key = get("attention.key_length_mla", None) or get("attention.key_length")
    value = get("attention.value_length_mla", None) or get("attention.value_length")
    q_lora = int(get("attention.q_lora_rank", 0) or 0)
    d |= {
        "num_key_value_heads": d["num_attention_heads"],
        "moe_intermediate_size": int(get("expert_feed_forward_length")),
        "n_shared_experts": int(get("expert_shared_count", 0)),
        "first_k_dense_replace": int(get("leading_dense_block_count", 0)),
        "routed_scaling_factor": float(get("expert_weights_scale", 1.0)),
        "norm_topk_prob": bool(get("expert_weights_norm", False)),
        "n_group": int(get("expert_group_count", 1) or 1),
        "topk_group": int(get("expert_group_used_count", 1) or 1),
        "kv_lora_rank": int(get("attention.kv_lora_rank")),
        "q_lora_rank": q_lora or None,
        "qk_rope_head_dim": rope_dim,
        "qk_nope_head_dim": int(key) - rope_dim,
        "v_head_dim": int(value),
    }
    return d


def _glm4_moe(get: Get, tensors: set[str]) -> dict[str, Any]:
    d = _common(get) | _moe(get, "n_routed_experts")
    nextn = int(get("nextn_predict_layers", 0) or 0)
    head_dim = int(get("attention.key_length"))
    d["rope_parameters"]["partial_rotary_factor"] = int(get("rope.dimension_count", head_dim)) / head_dim
    d |= {
        "num_hidden_layers": d["num_hidden_layers"] - nextn,
        "num_nextn_predict_layers": nextn,
        "head_dim": head_dim,
        "moe_intermediate_size": int(get("expert_feed_forward_length")),
        "n_shared_experts": int(get("expert_shared_count", 0)),
        "first_k_dense_replace": int(get("leading_dense_block_count", 0)),
        "routed_scaling_factor": float(get("expert_weights_scale", 1.0)),
        "norm_topk_prob": bool(get("expert_weights_norm", True)),
        "n_group": int(get("expert_group_count", 1) or 1),
        "topk_group": int(get("expert_group_used_count", 1) or 1),
        "use_qk_norm": "blk.0.attn_q_norm.weight" in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
    }
    return d


def _gpt_oss(get: Get, tensors: set[str]) -> dict[str, Any]:
    d = _common(get, theta_default=150000.0) | _moe(get, "num_local_experts")
    layers = d["num_hidden_layers"]
    d |= {
        "head_dim": int(get("attention.key_length")),
        "intermediate_size": int(get("expert_feed_forward_length", d.get("intermediate_size"))),
        "sliding_window": int(get("attention.sliding_window")),
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
    }
    if d["rope_parameters"]["rope_type"] == "yarn":
        d["rope_parameters"]["truncate"] = False  # as in GPT-OSS's published config; llama.cpp stores no key for it
    return d


def _dense_qwen(get: Get, tensors: set[str]) -> dict[str, Any]:
    d = _common(get, theta_default=1e6)
    if (head_dim := get("attention.key_length", None)) is not None:
        d["head_dim"] = int(head_dim)
    return d


# GGUF architecture -> (HF model_type, reader). "llama" is Mixtral when the file has experts.
FAMILIES: dict[str, tuple[str, Callable[[Get, set[str]], dict[str, Any]]]] = {
    "qwen3moe": ("qwen3_moe", _qwen3_moe),
    "qwen2moe": ("qwen2_moe", _qwen2_moe),
    "llama": ("llama", _llama_like),
    "deepseek2": ("deepseek_v3", _deepseek),
    "glm4moe": ("glm4_moe", _glm4_moe),
    "gpt-oss": ("gpt_oss", _gpt_oss),
    "qwen3": ("qwen3", _dense_qwen),
    "qwen2": ("qwen2", _dense_qwen),
}


def config_from_gguf(source) -> Any:
    """The ``PretrainedConfig`` described by a :class:`GGUFSource`'s metadata (WeightError if it cannot)."""
    from transformers import AutoConfig

    arch = source.architecture
    where = source.description
    if arch not in FAMILIES:
        raise WeightError(f"{where}: cannot build a config for GGUF architecture {arch!r} from its metadata "
                          f"(supported: {', '.join(sorted(FAMILIES))}); pass the model directory with its config.json")
    model_type, read = FAMILIES[arch]

    def get(key: str, default: Any = ...) -> Any:
        try:
            return source.metadata("{arch}." + key, default)
        except KeyError:
            raise WeightError(f"{where}: GGUF metadata key {arch}.{key} is missing (needed for the {model_type} config)") from None

    tensors = set(source.stored_names())
    fields = read(get, tensors)
    if model_type == "llama" and "num_local_experts" in fields:
        model_type = "mixtral"
    if model_type == "deepseek_v3" and int(get("expert_gating_func", 2)) == 1 and not any(".exp_probs_b." in t for t in tensors):
        model_type = "deepseek_v2"  # softmax routing without a score-correction bias
    embed = next((source.stored(n) for n in ("token_embd.weight",) if n in tensors), None)
    vocab = source.metadata("{arch}.vocab_size", None) or (embed.shape[0] if embed is not None else None)
    if vocab is None:
        tokens = source.metadata("tokenizer.ggml.tokens", None)
        vocab = len(tokens) if tokens else None
    if vocab is None:
        raise WeightError(f"{where}: cannot tell the vocabulary size (no {arch}.vocab_size, token_embd.weight or tokenizer tokens)")
    fields["vocab_size"] = int(vocab)
    fields["tie_word_embeddings"] = "output.weight" not in tensors
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")):
        value = source.metadata(f"tokenizer.ggml.{gguf_key}", None)
        if value is not None:
            fields[hf_key] = int(value)
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (TypeError, ValueError) as exc:
        raise WeightError(f"{where}: the GGUF metadata gives an invalid {model_type} config: {exc}") from None
