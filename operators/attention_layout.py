"""Which transformers attention modules ``cpu_attention`` computes exactly, and the facts it reads from them.

The operator replaces a module's forward with our own computation, so it accepts only classes whose forward
(and rotary helper) is known to be the standard one: q/k/v projections, an optional per-head RMSNorm of q and
k (weight * x / rms(x)), rotate-half rotary embedding with the model's cos/sin over the first cos.shape[-1]
dimensions of each head (all of them, or GLM-4-MoE's partial rotary), the cache update, softmax
attention with grouped KV heads and the model's mask, o_proj. Every class here has a parity test against the
transformers module (tests/operators/test_cpu_attention.py); a family whose attention differs in any of these
(MLA, sinks, soft-capping, interleaved rotary, q/k norm over the whole projection) is left to
transformers, with its projections still in our linear kernels.
"""

from __future__ import annotations

import dataclasses

from torch import nn

# transformers class name -> whether the class has per-head q_norm / k_norm (a string: the module attribute that
# says so).
SUPPORTED_CLASSES: dict[str, bool | str] = {
    "LlamaAttention": False,
    "MistralAttention": False,
    "MixtralAttention": False,
    "Qwen2Attention": False,
    "Qwen2MoeAttention": False,
    "Qwen3Attention": True,
    "Qwen3MoeAttention": True,
    "Dots1Attention": True,
    "MiniMaxAttention": False,
    "PhimoeAttention": False,
    "GraniteMoeAttention": False,
    "Glm4MoeAttention": "use_qk_norm",  # partial rotary: cos/sin cover the first dimensions of each head
}

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """What cpu_attention needs to know about one attention module."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    layer_idx: int
    qk_norm: bool
    norm_eps: float


def _is_plain_linear(module: object) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def has_qk_norm(module: nn.Module) -> bool:
    """Whether a supported attention module norms q and k per head."""
    flag = SUPPORTED_CLASSES[type(module).__name__]
    return bool(getattr(module, flag, False)) if isinstance(flag, str) else flag


def unsupported_attention(module: nn.Module) -> str | None:
    """Why cpu_attention cannot replace ``module`` (None: it can). Attribute reads only."""
    cls = type(module)
    if cls.__name__ not in SUPPORTED_CLASSES or not cls.__module__.startswith("transformers.models."):
        return f"{cls.__name__} is not an attention class cpu_attention knows ({', '.join(SUPPORTED_CLASSES)})"
    for name in _PROJECTIONS:
        if not _is_plain_linear(getattr(module, name, None)):
            return f"its {name} is not an nn.Linear"
    if has_qk_norm(module):
        for name in ("q_norm", "k_norm"):
            norm = getattr(module, name, None)
            if getattr(norm, "weight", None) is None or not hasattr(norm, "variance_epsilon"):
                return f"its {name} is not an RMSNorm with a weight"
    try:
        shape = attention_shape(module)
    except (AttributeError, TypeError, ValueError) as exc:
        return f"its shape cannot be read ({exc})"
    if shape.heads % shape.kv_heads:
        return f"{shape.heads} query heads are not a multiple of {shape.kv_heads} KV heads"
    return None


def attention_shape(module: nn.Module) -> AttentionShape:
    """The facts of a supported attention module (see unsupported_attention)."""
    config = module.config
    head_dim = int(module.head_dim)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    q, k, v, o = (getattr(module, name) for name in _PROJECTIONS)
    if q.out_features != heads * head_dim or k.out_features != kv_heads * head_dim or v.out_features != k.out_features:
        raise ValueError(
            f"q/k/v project to {q.out_features}/{k.out_features}/{v.out_features}, expected "
            f"{heads}x{head_dim} and {kv_heads}x{head_dim}"
        )
    if o.in_features != heads * head_dim or o.out_features != q.in_features:
        raise ValueError(f"o_proj is {o.in_features} -> {o.out_features}")
    qk_norm = has_qk_norm(module)
    return AttentionShape(
        hidden=int(q.in_features),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        scale=float(module.scaling),
        layer_idx=int(module.layer_idx),
        qk_norm=qk_norm,
        norm_eps=float(module.q_norm.variance_epsilon) if qk_norm else 0.0,
    )
