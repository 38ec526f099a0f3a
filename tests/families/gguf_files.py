"""A float32 GGUF of any family's tiny model, named as llama.cpp's converter names it (for round-trip tests).

Independent of ktinject's reader on purpose, like ``tests/gguf_writer.py`` (whose per-family writer covers the
families with built-in rules): names come from gguf-py's ``TensorNameMap`` in the HF -> GGUF direction, and
the experts are stored as llama.cpp stores them, stacked per projection (``ffn_gate_exps`` / ``ffn_up_exps``
``[E, I, H]``, ``ffn_down_exps`` ``[E, H, I]``), whatever the HF layout (transposed, interleaved, biased).
Only the metadata the loader reads when a config.json is given is written (the architecture, the block count).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf_writer import _permute
from ktinject.operators.experts_layout import ALL_FEATURES, canonical_weights, experts_spec, looks_like_experts
from torch import nn

# model type -> the architecture llama.cpp's converter writes for it (those gguf-py has a name map for).
GGUF_ARCHES: dict[str, str] = {
    "afmoe": "afmoe",
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",
    "glm4_moe_lite": "deepseek2",
    "dots1": "dots1",
    "exaone_moe": "exaone-moe",
    "glm4_moe": "glm4moe",
    "glm_moe_dsa": "glm-dsa",
    "gpt_oss": "gpt-oss",
    "hunyuan_v1_moe": "hunyuan-moe",
    "jamba": "jamba",
    "lfm2_moe": "lfm2moe",
    "mimo_v2_flash": "mimo2",
    "minimax_m2": "minimax-m2",
    "mistral4": "mistral4",
    "mixtral": "llama",
    "olmoe": "olmoe",
    "phimoe": "phimoe",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
}
# Families whose llama.cpp files tie the output to token_embd (gguf-py has no name for a separate LM head).
TIED = frozenset({"lfm2_moe"})

_VLM = (
    "a vision-language model: llama.cpp keeps the vision tower in a separate mmproj GGUF, which "
    "from_pretrained(gguf=) does not read"
)
_NO_ARCH = "gguf-py has no architecture for it"

# model type -> why there is no round trip (what gguf-py's name maps or ktinject's GGUF reader lack).
NO_ROUND_TRIP: dict[str, str] = {
    "bailing_hybrid": "gguf-py's bailingmoe2 map has no names for the hybrid's attention (q_proj, linear attention)",
    "cohere2_moe": "gguf-py's cohere2 map has no names for routed experts",
    "dbrx": "gguf-py maps DBRX's flat mlp.w1/v1/w2 [E*I, H] to per-expert ffn_*_exps [E, I, H]; ktinject's GGUF "
    "reader has no layout to reshape them back",
    "deepseek_v32": "gguf-py has no DeepSeek-V3.2 architecture",
    "ernie4_5_moe": "gguf-py's ernie4_5-moe map has no name for the router's moe_statics.e_score_correction_bias",
    "flex_olmo": "gguf-py has no FlexOlmo architecture (olmoe's map lacks post_feedforward_layernorm)",
    "granitemoe": "gguf-py's granitemoe map has no names for transformers 5's block_sparse_moe.experts projections",
    "granitemoeshared": "gguf-py's granitemoe map has no names for transformers 5's block_sparse_moe.experts projections",
    "granitemoehybrid": "gguf-py's granitehybrid map has no names for transformers 5's block_sparse_moe.experts projections",
    "granitemoe_swa": "gguf-py has no architecture for Granite-MoE with sliding-window attention",
    "hy_v3": "gguf-py's hunyuan-moe map has no name for HY-V3's mlp.e_score_correction_bias",
    "kimi_linear": "gguf-py's kimi-linear map has no names for the linear attention's conv1d and forget gate",
    "llama4": "llama.cpp splits Llama-4's transposed, concatenated gate_up_proj; ktinject's GGUF reader rebuilds "
    "transposed experts only when gate/up are interleaved (GPT-OSS)",
    "minimax": "gguf-py has no MiniMax-01 architecture (lightning attention)",
    "nemotron_h": "gguf-py's nemotron_h_moe map names the original checkpoint's backbone.layers.N.mixer.*, not "
    "transformers 5's model.layers.N.mixer.experts",
    "qwen3_next": "gguf-py's qwen3next map has no name for the linear attention's dt_bias",
    **{
        mt: _VLM
        for mt in (
            "aria",
            "deepseek_ocr2",
            "diffusion_gemma",
            "dots3_note",
            "ernie4_5_vl_moe",
            "gemma4",
            "glm4v_moe",
            "glm5_next",
            "hy_v4_vl",
            "inkling_mm_model",
            "inkling2",
            "inkling2_loop",
            "minimax_m3_vl",
            "mistral_large4",
            "muse_spark",
            "qwen3_5_moe",
            "qwen3_omni_moe_thinker",
            "qwen3_vl_moe",
            "qwen4_exp",
            "step3p7",
            "unlimited_ocr",
        )
    },
    **{
        mt: _NO_ARCH
        for mt in (
            "axk1",
            "axk2",
            "beam",
            "deepseek_v4",
            "flint",
            "hy_v4",
            "kolibri1",
            "laguna",
            "lara_mini",
            "longcat_flash",
            "mellum",
            "solar_open",
            "zaya",
        )
    },
    "jetmoe": "ktinject does not run it (no experts module)",
    "openai_privacy_filter": "ktinject does not run it (a token classifier)",
}


def _arch(name: str) -> gguf.MODEL_ARCH:
    return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name)


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).numpy())


def gguf_tensors(model: nn.Module, arch: str) -> dict[str, np.ndarray]:
    """GGUF name -> float32 data for every tensor of ``model``; KeyError naming the first HF tensor gguf-py's map
    for ``arch`` has no name for."""
    config = model.config
    text = getattr(config, "text_config", None) or config
    layers = int(getattr(text, "num_hidden_layers"))
    name_map = gguf.get_tensor_name_map(_arch(arch), layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    modules = dict(model.named_modules())
    out: dict[str, np.ndarray] = {}

    def mapped(hf_base: str, hf_name: str) -> str:
        name = name_map.get_name(hf_base)
        if name is None:
            raise KeyError(f"gguf-py's {arch} map has no name for {hf_name}")
        return name

    experts = {name for name, m in modules.items() if looks_like_experts(m)}
    for base in experts:  # stacked per projection, canonical orientation
        spec = experts_spec(modules[base], name=base, supports=ALL_FEATURES)
        w = canonical_weights(modules[base], spec)
        parts = {"gate_proj": (w.gate, w.gate_bias), "up_proj": (w.up, w.up_bias), "down_proj": (w.down, w.down_bias)}
        for proj, (weight, bias) in parts.items():
            if weight is None:
                continue
            target = mapped(f"{base}.{proj}", f"{base}.{proj}")
            out[target + ".weight"] = _f32(weight)
            if bias is not None:
                out[target + ".bias"] = _f32(bias)
    for name, tensor in model.state_dict().items():
        base, _, leaf = name.rpartition(".")
        if base in experts or (name == "lm_head.weight" and tied):
            continue
        if leaf in ("weight", "bias"):
            data = tensor
            if arch == "llama" and base.endswith(("self_attn.q_proj", "self_attn.k_proj")) and leaf == "weight":
                heads = text.num_attention_heads if base.endswith("q_proj") else text.num_key_value_heads
                data = _permute(tensor, heads)  # llama.cpp's rope row order
            out[f"{mapped(base, name)}.{leaf}"] = _f32(data)
        elif leaf == "e_score_correction_bias":
            out[mapped(f"{base}.e_score_correction", name) + ".bias"] = _f32(tensor)
        else:  # a bare parameter (sinks, A_log ...): the whole name is mapped
            out[mapped(name, name) + (".weight" if leaf == "sinks" else "")] = _f32(tensor)
    return out


def write_family_gguf(model: nn.Module, path: Path, arch: str) -> Path:
    """``model`` as a float32 GGUF of architecture ``arch``."""
    tensors = gguf_tensors(model, arch)
    text = getattr(model.config, "text_config", None) or model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(int(text.num_hidden_layers))
    writer.add_embedding_length(int(text.hidden_size))
    writer.add_vocab_size(int(text.vocab_size))
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
