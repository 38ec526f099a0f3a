"""Write a Hugging Face model to GGUF the way llama.cpp's converter lays it out (for tests and benchmarks).

Independent of ktinject's reader on purpose: names come from gguf-py's ``TensorNameMap`` in the HF -> GGUF
direction, and the data gets llama.cpp's conversions (experts stacked per projection, GPT-OSS's gate/up
de-interleaved and transposed, llama-arch q/k rows permuted for its rope, DeepSeek MLA ``kv_b_proj`` split
into ``attn_k_b`` (transposed) + ``attn_v_b``). Per-tensor types: F32/F16/BF16/Q8_0 through gguf-py's
quantizer, Q4_K/Q5_K/Q6_K through our C++ quantizer (``ktinject.native``), whose blocks gguf-py dequantizes
bit-exactly. A row length that is not a multiple of the type's block falls back to F16, as llama.cpp does.

Tensors are written one at a time (``add_tensor_info`` first, data after), so a multi-GB model can be written
from a meta model and a ``fill`` function without ever holding it in memory.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

ARCHES = {
    "qwen3_moe": "qwen3moe",
    "qwen2_moe": "qwen2moe",
    "mixtral": "llama",
    "llama": "llama",
    "deepseek_v3": "deepseek2",
    "glm4_moe": "glm4moe",
    "gpt_oss": "gpt-oss",
}
NATIVE_TYPES = {Q.Q4_K, Q.Q5_K, Q.Q6_K}
TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K}


def _arch_enum(name: str) -> gguf.MODEL_ARCH:
    return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order for the llama architecture: (heads, 2, d/2, ...) -> (heads, d/2, 2, ...)."""
    n = w.shape[0]
    return w.reshape(heads, 2, n // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`_permute` (for rebuilding reference models)."""
    n = w.shape[0]
    return w.reshape(heads, n // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope_params(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or {})


def _add_grouped_sigmoid_experts(w, c) -> None:
    """DeepSeek-V3 / GLM-4-MoE routing metadata: routed + shared experts, sigmoid gating over expert groups."""
    w.add_expert_count(c.n_routed_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_shared_count(c.n_shared_experts)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_weights_scale(c.routed_scaling_factor)
    w.add_expert_weights_norm(bool(c.norm_topk_prob))
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_group_count(c.n_group)
    w.add_expert_group_used_count(c.topk_group)


def write_metadata(writer: gguf.GGUFWriter, config) -> None:
    """Hyperparameters under the keys llama.cpp's converter uses for each family."""
    c = config
    mt = c.model_type
    rope = _rope_params(c)
    w = writer
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(1 if mt == "deepseek_v3" else c.num_key_value_heads)  # MLA files: one latent "kv head"
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    w.add_vocab_size(c.vocab_size)
    for key, value in (("bos", c.bos_token_id), ("eos", c.eos_token_id), ("pad", c.pad_token_id)):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(rope.get("beta_fast", 32.0))
        w.add_rope_scaling_yarn_beta_slow(rope.get("beta_slow", 1.0))
        if "mscale_all_dim" in rope:
            w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if mt in ("qwen3_moe", "qwen2_moe"):
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
        w.add_expert_weights_norm(bool(c.norm_topk_prob))
        if mt == "qwen3_moe":
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        else:
            w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    elif mt in ("llama", "mixtral"):
        w.add_rope_dimension_count(head_dim)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        if mt == "mixtral":
            w.add_expert_count(c.num_local_experts)
            w.add_expert_used_count(c.num_experts_per_tok)
    elif mt == "deepseek_v3":
        w.add_leading_dense_block_count(c.first_k_dense_replace)
        if c.q_lora_rank:
            w.add_q_lora_rank(c.q_lora_rank)
        w.add_kv_lora_rank(c.kv_lora_rank)
        w.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
        w.add_value_length(c.kv_lora_rank)
        w.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
        w.add_value_length_mla(c.v_head_dim)
        w.add_rope_dimension_count(c.qk_rope_head_dim)
        _add_grouped_sigmoid_experts(w, c)
    elif mt == "glm4_moe":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        w.add_nextn_predict_layers(0)
        w.add_leading_dense_block_count(c.first_k_dense_replace)
        _add_grouped_sigmoid_experts(w, c)
    elif mt == "gpt_oss":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_expert_count(c.num_local_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(c.intermediate_size)
        w.add_sliding_window(c.sliding_window)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One GGUF tensor: where it comes from in the HF state dict, and how to put decoded data back."""

    gguf_name: str
    shape: tuple[int, ...]  # logical, numpy order
    make: Callable[[], np.ndarray]  # the float32 data to encode
    hf_name: str
    unplace: Callable[[torch.Tensor, torch.Tensor], None]  # (HF tensor, decoded GGUF tensor): write back in place


def _copy(target: torch.Tensor, decoded: torch.Tensor) -> None:
    target.copy_(decoded.reshape(target.shape))


def hf_to_gguf(
    state: Mapping[str, torch.Tensor],
    config,
    fill: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    *,
    mla_split: bool = True,
) -> Iterator[Entry]:
    """The GGUF tensors of an HF state dict, lazily (``fill`` makes data for meta tensors)."""
    mt = config.model_type
    arch = ARCHES[mt]
    name_map = gguf.get_tensor_name_map(_arch_enum(arch), config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    gpt_oss = mt == "gpt_oss"

    def data(name: str) -> torch.Tensor:
        t = state[name]
        return fill(name, t) if t.is_meta else t

    def gguf_name(hf_base: str) -> str:
        mapped = name_map.get_name(hf_base)
        if mapped is None:
            raise KeyError(f"gguf-py has no GGUF name for {hf_base} (arch {arch})")
        return mapped

    for name, t in state.items():
        shape = tuple(t.shape)
        if name == "lm_head.weight" and tied:
            continue
        base, _, leaf = name.rpartition(".")
        if base.endswith(".experts") and leaf in ("gate_up_proj", "gate_up_proj_bias"):
            suffix = ".bias" if leaf.endswith("_bias") else ".weight"
            for i, proj in enumerate(("gate_proj", "up_proj")):
                target = gguf_name(f"{base}.{proj}") + suffix
                if gpt_oss and suffix == ".weight":  # [E, H, 2I] interleaved -> [E, I, H]
                    yield Entry(
                        target,
                        (shape[0], shape[2] // 2, shape[1]),
                        lambda n=name, i=i: _np(data(n)[..., i::2].transpose(1, 2)),
                        name,
                        lambda hf, dec, i=i: hf[..., i::2].copy_(dec.transpose(1, 2)),
                    )
                elif gpt_oss:  # bias [E, 2I] interleaved -> [E, I]
                    yield Entry(
                        target,
                        (shape[0], shape[1] // 2),
                        lambda n=name, i=i: _np(data(n)[..., i::2]),
                        name,
                        lambda hf, dec, i=i: hf[..., i::2].copy_(dec),
                    )
                else:  # [E, 2I, H] -> [E, I, H], gate rows first
                    h = shape[1] // 2
                    yield Entry(
                        target,
                        (shape[0], h, *shape[2:]),
                        lambda n=name, i=i, h=h: _np(data(n)[:, i * h : (i + 1) * h]),
                        name,
                        lambda hf, dec, i=i, h=h: hf[:, i * h : (i + 1) * h].copy_(dec),
                    )
            continue
        if base.endswith(".experts") and leaf in ("down_proj", "down_proj_bias"):
            suffix = ".bias" if leaf.endswith("_bias") else ".weight"
            target = gguf_name(f"{base}.down_proj") + suffix
            if gpt_oss and suffix == ".weight":  # [E, I, H] -> [E, H, I]
                yield Entry(
                    target,
                    (shape[0], shape[2], shape[1]),
                    lambda n=name: _np(data(n).transpose(1, 2)),
                    name,
                    lambda hf, dec: hf.copy_(dec.transpose(1, 2)),
                )
            else:
                yield Entry(target, shape, lambda n=name: _np(data(n)), name, _copy)
            continue
        if leaf == "e_score_correction_bias":
            yield Entry(
                gguf_name(f"{base}.e_score_correction") + ".bias", shape, lambda n=name: _np(data(n)), name, _copy
            )
            continue
        if leaf == "sinks":
            yield Entry(gguf_name(name) + ".weight", shape, lambda n=name: _np(data(n)), name, _copy)
            continue
        if base.endswith("self_attn.kv_b_proj") and mt == "deepseek_v3" and mla_split:
            module = base.rpartition(".")[0]
            heads, nope, vdim, rank = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim, shape[1]

            def view(x: torch.Tensor, h=heads, w=nope + vdim, r=rank) -> torch.Tensor:
                return x.view(h, w, r)

            yield Entry(
                gguf_name(f"{module}.k_b_proj") + ".weight",
                (heads, rank, nope),
                lambda n=name, v=view, k=nope: _np(v(data(n))[:, :k].transpose(1, 2)),
                name,
                lambda hf, dec, v=view, k=nope: v(hf)[:, :k].copy_(dec.transpose(1, 2)),
            )
            yield Entry(
                gguf_name(f"{module}.v_b_proj") + ".weight",
                (heads, vdim, rank),
                lambda n=name, v=view, k=nope: _np(v(data(n))[:, k:]),
                name,
                lambda hf, dec, v=view, k=nope: v(hf)[:, k:].copy_(dec),
            )
            continue
        target = gguf_name(base) + "." + leaf
        if arch == "llama" and (base.endswith("self_attn.q_proj") or base.endswith("self_attn.k_proj")):
            heads = config.num_attention_heads if base.endswith("q_proj") else config.num_key_value_heads
            yield Entry(
                target,
                shape,
                lambda n=name, h=heads: _np(_permute(data(n), h)),
                name,
                lambda hf, dec, h=heads: hf.copy_(_unpermute(dec, h)),
            )
            continue
        yield Entry(target, shape, lambda n=name: _np(data(n)), name, _copy)


def default_types(gguf_name: str, shape: tuple[int, ...]) -> str:
    """F32 for vectors, Q8_0 for the routed experts, F16 for the rest (fallbacks apply per row size)."""
    if len(shape) <= 1:
        return "f32"
    return "q8_0" if "_exps." in gguf_name else "f16"


def _block(qtype: Q) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def _encode(array: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == Q.F16:
        return array.astype(np.float16)
    if qtype in NATIVE_TYPES:
        from ktinject.native import native

        rows = np.ascontiguousarray(array.reshape(-1, array.shape[-1]), dtype=np.float32)
        blocks = native().quantize(int(qtype), rows)
        return blocks.reshape(*array.shape[:-1], blocks.shape[-1])
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def write_gguf(
    model_or_state,
    path: str | Path,
    *,
    config=None,
    types: Callable[[str, tuple[int, ...]], str] = default_types,
    fill: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    split_max_tensors: int = 0,
    mla_split: bool = True,
    skip: Callable[[str], bool] = lambda name: False,
    vocab: bool = False,
) -> list[Path]:
    """Write ``model_or_state`` (a model, or a state dict with ``config=``) to ``path``; returns the files.

    ``vocab=True`` adds a dummy SPM vocabulary (``<unk> <s> </s> <t3> ...``), which llama.cpp needs to load a file."""
    if isinstance(model_or_state, torch.nn.Module):
        config = config or model_or_state.config
        state = model_or_state.state_dict()
    else:
        state = dict(model_or_state)
    path = Path(path)
    arch = ARCHES[config.model_type]
    writer = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    write_metadata(writer, config)
    if vocab:
        add_dummy_vocab(writer, config.vocab_size)
    entries = [e for e in hf_to_gguf(state, config, fill, mla_split=mla_split) if not skip(e.gguf_name)]
    chosen: list[Q] = []
    for entry in entries:
        name, shape = entry.gguf_name, entry.shape
        qtype = TYPES[types(name, shape)]
        if qtype not in (Q.F32, Q.F16) and shape[-1] % _block(qtype):
            qtype = Q.F16
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * type_size
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        chosen.append(qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for entry, qtype in zip(entries, chosen):
        writer.write_tensor_data(_encode(entry.make(), qtype))
    writer.close()
    return writer.format_shard_names(path)


def add_dummy_vocab(writer: gguf.GGUFWriter, size: int) -> None:
    """An SPM vocabulary of ``size`` placeholder tokens (ids 0-2: unk, bos, eos), enough for llama.cpp to load."""
    writer.add_tokenizer_model("llama")
    writer.add_token_list([b"<unk>", b"<s>", b"</s>"] + [f"<t{i}>".encode() for i in range(3, size)])
    writer.add_token_scores([0.0] * size)
    writer.add_token_types([2, 3, 3] + [1] * (size - 3))
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)


def dequantized_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the GGUF ``files`` dequantized by gguf-py, by GGUF name."""
    from gguf import GGUFReader

    out = {}
    for file in files:
        for t in GGUFReader(file).tensors:
            array = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            out[t.name] = torch.from_numpy(np.array(array, dtype=np.float32))
    return out


def reference_model(model: torch.nn.Module, files: list[Path], **writer_kwargs) -> torch.nn.Module:
    """A copy of ``model`` whose weights are gguf-py's dequantization of ``files`` (written from ``model``)."""
    reference = copy.deepcopy(model)
    state = reference.state_dict()
    decoded = dequantized_tensors(files)
    with torch.no_grad():
        for entry in hf_to_gguf(model.state_dict(), model.config, **writer_kwargs):
            if entry.gguf_name in decoded:
                entry.unplace(state[entry.hf_name], decoded[entry.gguf_name].to(state[entry.hf_name].dtype))
    return reference


def kquant_types(gguf_name: str, shape: tuple[int, ...]) -> str:
    """K-quant experts as in real Q4_K_M files: gate/up Q4_K, down Q6_K; Q8_0 matrices, F16 embeddings."""
    if len(shape) <= 1:
        return "f32"
    if "_exps." in gguf_name:
        return "q6_k" if "ffn_down" in gguf_name else "q4_k"
    return "f16" if gguf_name.startswith(("token_embd", "output.")) else "q8_0"


# Tiny-model overrides whose expert rows (hidden and expert intermediate sizes) fit 256-wide K-quant blocks.
KQUANT_SIZES: dict[str, dict] = {
    "qwen3_moe": dict(hidden_size=256, moe_intermediate_size=256, mlp_only_layers=[], num_experts=4),
    "qwen2_moe": dict(hidden_size=256, moe_intermediate_size=256, num_experts=4),
    "deepseek_v3": dict(hidden_size=256, moe_intermediate_size=256, n_routed_experts=4, n_group=1, topk_group=1),
    "mixtral": dict(hidden_size=256, intermediate_size=256),
}


def torch_rules(experts_op: str = "torch_experts", device: str = "cpu") -> str:
    """Rules for the loading tests, independent of the shipped rule files (which may move the experts to
    another operator): routed experts on ``experts_op`` on the CPU, projections on torch_linear and the rest
    kept, on ``device``."""
    return f"""
rules:
  - name: experts
    match: {{name: '^model\\.layers\\.\\d+\\.mlp\\.experts$'}}
    replace: {{op: {experts_op}, device: cpu}}
  - name: projections
    match: {{name: '\\.(self_attn|mlp)\\.(\\w+\\.)*\\w+_proj$', class: Linear}}
    replace: {{op: torch_linear, device: '{device}'}}
  - name: rest
    match: {{name: '^$'}}
    replace: {{op: keep, device: '{device}'}}
"""
