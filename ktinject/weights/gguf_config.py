"""A transformers config from GGUF metadata, for the families with built-in rules.

Used when ``from_pretrained`` gets only a GGUF file. llama.cpp's converter writes each HF hyperparameter to a
GGUF key (``{arch}.attention.head_count`` ...); here each family reads them back. One table per family,
no guessing: a key the family needs and the file lacks is a WeightError naming key and file. Every value is
type- and range-checked as it is read (:class:`Keys`), and the result is checked against the tensors the
file holds (``gguf_model_checks``) before transformers sees it, so a bad value is an error naming its key,
not a model built with sizes no tensor has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ktinject.errors import WeightError
from ktinject.weights.gguf_metadata import GGUFMetadata
from ktinject.weights.gguf_model_checks import check_config_fields, check_shapes_on_meta

# llama.cpp's rope scaling types that map to a transformers rope_type read from the keys below.
_ROPE_TYPES = {"none": "default", "linear": "linear", "yarn": "yarn"}


class Keys:
    """Checked reads of ``{arch}.<key>`` for one family's config (see :class:`GGUFMetadata`)."""

    def __init__(self, meta: GGUFMetadata, model_type: str) -> None:
        self.meta = meta
        self.needed_for = f"the {model_type} config"

    def _key(self, key: str) -> str:
        return "{arch}." + key

    def has(self, key: str) -> bool:
        return self._key(key) in self.meta

    def integer(self, key: str, default: Any = ..., *, minimum: int = 1, maximum: int | None = None) -> Any:
        return self.meta.integer(self._key(key), default, minimum=minimum, maximum=maximum, needed_for=self.needed_for)

    def integers(self, key: str, default: Any = ..., *, minimum: int = 1) -> Any:
        return self.meta.integers(self._key(key), default, minimum=minimum, needed_for=self.needed_for)

    def number(self, key: str, default: Any = ..., *, positive: bool = True) -> Any:
        return self.meta.number(self._key(key), default, positive=positive, needed_for=self.needed_for)

    def flag(self, key: str, default: Any = ...) -> Any:
        return self.meta.flag(self._key(key), default, needed_for=self.needed_for)

    def text(self, key: str, default: Any = ...) -> Any:
        return self.meta.text(self._key(key), default, needed_for=self.needed_for)


def _rope(get: Keys, theta_default: float) -> dict[str, Any]:
    """``rope_parameters`` (transformers v5) from the ``rope.*`` keys."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": get.number("rope.freq_base", theta_default)}
    kind = get.text("rope.scaling.type", "none") or "none"
    if kind not in _ROPE_TYPES:
        raise WeightError(
            f"{get.meta.where}: GGUF metadata key {get.meta.key('{arch}.rope.scaling.type')} is {kind!r}; "
            f"ktinject reads {', '.join(map(repr, _ROPE_TYPES))}"
        )
    if kind == "none":
        return rope
    rope["rope_type"] = _ROPE_TYPES[kind]
    rope["factor"] = get.number("rope.scaling.factor", 1.0)
    original = get.integer("rope.scaling.original_context_length", None)
    if original is not None:
        rope["original_max_position_embeddings"] = original
    if kind == "yarn":
        rope["beta_fast"] = get.number("rope.scaling.yarn_beta_fast", 32.0)
        rope["beta_slow"] = get.number("rope.scaling.yarn_beta_slow", 1.0)
        log_mul = get.number("rope.scaling.yarn_log_multiplier", None, positive=False)
        if log_mul is not None:  # llama.cpp writes 0.1 * mscale_all_dim
            rope["mscale"] = rope["mscale_all_dim"] = log_mul / 0.1
    return rope


def _common(get: Keys, *, theta_default: float = 10000.0) -> dict[str, Any]:
    heads = get.integer("attention.head_count")
    kv = get.integers("attention.head_count_kv", heads)
    kv = max(kv) if isinstance(kv, list) else kv
    out = {
        "hidden_size": get.integer("embedding_length"),
        "num_hidden_layers": get.integer("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "rms_norm_eps": get.number("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_parameters": _rope(get, theta_default),
    }
    if (ctx := get.integer("context_length", None)) is not None:
        out["max_position_embeddings"] = ctx
    if (ff := get.integer("feed_forward_length", None)) is not None:
        out["intermediate_size"] = ff
    return out


def _moe(get: Keys, experts_key: str) -> dict[str, Any]:
    return {
        experts_key: get.integer("expert_count"),
        "num_experts_per_tok": get.integer("expert_used_count"),
    }


def _qwen3_moe(get: Keys, tensors: set[str]) -> dict[str, Any]:
    d = _common(get, theta_default=1e6) | _moe(get, "num_experts")
    d |= {
        "moe_intermediate_size": get.integer("expert_feed_forward_length"),
        "head_dim": get.integer("attention.key_length"),
        "norm_topk_prob": get.flag("expert_weights_norm", True),
        "mlp_only_layers": [],
        "decoder_sparse_step": 1,
    }
    return d


def _qwen2_moe(get: Keys, tensors: set[str]) -> dict[str, Any]:
    d = _common(get, theta_default=1e6) | _moe(get, "num_experts")
    d |= {
        "moe_intermediate_size": get.integer("expert_feed_forward_length"),
        "shared_expert_intermediate_size": get.integer("expert_shared_feed_forward_length"),
        "norm_topk_prob": get.flag("expert_weights_norm", False),
        "mlp_only_layers": [],
        "decoder_sparse_step": 1,
    }
    return d


def _llama_like(get: Keys, tensors: set[str]) -> dict[str, Any]:
    d = _common(get)
    head_dim = get.integer("attention.key_length", None) or get.integer("rope.dimension_count", None)
    if head_dim:
        d["head_dim"] = head_dim
    if get.integer("expert_count", 0, minimum=0):
        d |= _moe(get, "num_local_experts")
        d["intermediate_size"] = get.integer("expert_feed_forward_length", d.get("intermediate_size"))
    return d


def _grouped_routing(get: Keys, norm_default: bool) -> dict[str, Any]:
    """DeepSeek-V3 / GLM-4-MoE: shared experts, dense first layers, group-limited routing."""
    return {
        "moe_intermediate_size": get.integer("expert_feed_forward_length"),
        "n_shared_experts": get.integer("expert_shared_count", 0, minimum=0),
        "first_k_dense_replace": get.integer("leading_dense_block_count", 0, minimum=0),
        "routed_scaling_factor": get.number("expert_weights_scale", 1.0),
        "norm_topk_prob": get.flag("expert_weights_norm", norm_default),
        "n_group": get.integer("expert_group_count", 0, minimum=0) or 1,
        "topk_group": get.integer("expert_group_used_count", 0, minimum=0) or 1,
    }


def _deepseek(get: Keys, tensors: set[str]) -> dict[str, Any]:
    d = _common(get) | _moe(get, "n_routed_experts")
    rope_dim = get.integer("rope.dimension_count")
    # MLA files converted for llama.cpp's absorbed attention say key_length_mla/value_length_mla and set
    # head_count_kv to 1; older files give the per-head sizes in key_length/value_length.
    mla = get.has("attention.key_length_mla")
    key = get.integer("attention.key_length_mla" if mla else "attention.key_length")
    value = get.integer(
        "attention.value_length_mla" if get.has("attention.value_length_mla") else "attention.value_length"
    )
    q_lora = get.integer("attention.q_lora_rank", 0, minimum=0)
    if key <= rope_dim:
        raise WeightError(
            f"{get.meta.where}: GGUF metadata key {get.meta.key('{arch}.attention.key_length' + ('_mla' if mla else ''))} "
            f"is {key}, but the key head must be longer than its rope part ({get.meta.key('{arch}.rope.dimension_count')} "
            f"is {rope_dim})"
        )
    d |= _grouped_routing(get, norm_default=False)
    d |= {
        "num_key_value_heads": d["num_attention_heads"],
        "kv_lora_rank": get.integer("attention.kv_lora_rank"),
        "q_lora_rank": q_lora or None,
        "qk_rope_head_dim": rope_dim,
        "qk_nope_head_dim": key - rope_dim,
        "v_head_dim": value,
    }
    return d


def _glm4_moe(get: Keys, tensors: set[str]) -> dict[str, Any]:
    d = _common(get) | _moe(get, "n_routed_experts")
    blocks = d["num_hidden_layers"]
    nextn = get.integer("nextn_predict_layers", 0, minimum=0, maximum=blocks - 1)
    head_dim = get.integer("attention.key_length")
    d["rope_parameters"]["partial_rotary_factor"] = (
        get.integer("rope.dimension_count", head_dim, maximum=head_dim) / head_dim
    )
    d |= _grouped_routing(get, norm_default=True)
    d |= {
        "num_hidden_layers": blocks - nextn,
        "num_nextn_predict_layers": nextn,
        "head_dim": head_dim,
        "use_qk_norm": "blk.0.attn_q_norm.weight" in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
    }
    return d


def _gpt_oss(get: Keys, tensors: set[str]) -> dict[str, Any]:
    d = _common(get, theta_default=150000.0) | _moe(get, "num_local_experts")
    layers = d["num_hidden_layers"]
    d |= {
        "head_dim": get.integer("attention.key_length"),
        "intermediate_size": get.integer("expert_feed_forward_length", d.get("intermediate_size")),
        "sliding_window": get.integer("attention.sliding_window"),
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
    }
    if d["rope_parameters"]["rope_type"] == "yarn":
        d["rope_parameters"]["truncate"] = False  # as in GPT-OSS's published config; llama.cpp stores no key for it
    return d


def _dense_qwen(get: Keys, tensors: set[str]) -> dict[str, Any]:
    d = _common(get, theta_default=1e6)
    if (head_dim := get.integer("attention.key_length", None)) is not None:
        d["head_dim"] = head_dim
    return d


# GGUF architecture -> (HF model_type, reader). "llama" is Mixtral when the file has experts.
FAMILIES: dict[str, tuple[str, Callable[[Keys, set[str]], dict[str, Any]]]] = {
    "qwen3moe": ("qwen3_moe", _qwen3_moe),
    "qwen2moe": ("qwen2_moe", _qwen2_moe),
    "llama": ("llama", _llama_like),
    "deepseek2": ("deepseek_v3", _deepseek),
    "glm4moe": ("glm4_moe", _glm4_moe),
    "gpt-oss": ("gpt_oss", _gpt_oss),
    "qwen3": ("qwen3", _dense_qwen),
    "qwen2": ("qwen2", _dense_qwen),
}


def _vocab_size(source, meta: GGUFMetadata, tensors: set[str]) -> int:
    """``{arch}.vocab_size``, else the rows of ``token_embd.weight``, else the number of tokenizer tokens."""
    vocab = meta.integer("{arch}.vocab_size", None)
    if vocab is None and "token_embd.weight" in tensors:
        vocab = source.stored("token_embd.weight").shape[0]
    if vocab is None:
        vocab = meta.length("tokenizer.ggml.tokens") or None
    if vocab is None:
        raise WeightError(
            f"{meta.where}: cannot tell the vocabulary size (no {meta.arch}.vocab_size, "
            "token_embd.weight or tokenizer tokens)"
        )
    return int(vocab)


def config_from_gguf(source) -> Any:
    """The ``PretrainedConfig`` described by a :class:`GGUFSource`'s metadata (WeightError if it cannot)."""
    from transformers import AutoConfig

    arch = source.architecture
    meta: GGUFMetadata = source.meta
    where = source.description
    if arch not in FAMILIES:
        raise WeightError(
            f"{where}: cannot build a config for GGUF architecture {arch!r} from its metadata "
            f"(supported: {', '.join(sorted(FAMILIES))}); pass the model directory with its config.json"
        )
    model_type, read = FAMILIES[arch]
    get = Keys(meta, model_type)
    tensors = set(source.stored_names())
    fields = read(get, tensors)
    if model_type == "llama" and "num_local_experts" in fields:
        model_type = "mixtral"
    if (
        model_type == "deepseek_v3"
        and get.integer("expert_gating_func", 2) == 1
        and not any(".exp_probs_b." in t for t in tensors)
    ):
        model_type = "deepseek_v2"  # softmax routing without a score-correction bias
    fields["vocab_size"] = _vocab_size(source, meta, tensors)
    fields["tie_word_embeddings"] = "output.weight" not in tensors
    for hf_key, gguf_key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        value = meta.integer(f"tokenizer.ggml.{gguf_key}", None, minimum=0, maximum=fields["vocab_size"] - 1)
        if value is not None:
            fields[hf_key] = value
    check_config_fields(fields, model_type, source)
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except Exception as exc:  # transformers' own validation, whatever it raises: name the file
        raise WeightError(
            f"{where}: the GGUF metadata gives an invalid {model_type} config ({type(exc).__name__}: {exc})"
        ) from None
    check_shapes_on_meta(config, source)
    return config
