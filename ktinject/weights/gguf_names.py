"""HF tensor names -> GGUF tensors, through gguf-py's name maps (``gguf.TensorNameMap``).

gguf-py's map is what llama.cpp's converter uses in the HF -> GGUF direction; we look HF names up in it
and then undo the few conversions the converter applies to the data (see ``layouts``):

- the fused experts of transformers v5 (``experts.gate_up_proj``) come from the map's stacked
  ``experts.gate_proj`` and ``experts.up_proj`` (``ffn_gate_exps`` + ``ffn_up_exps``), or a fused
  ``ffn_gate_up_exps`` when the file has one; GPT-OSS's interleaved, transposed layout is rebuilt from them;
- ``attn_q``/``attn_k`` of the llama architecture (Llama, Mistral, Mixtral) have llama.cpp's rope row order;
- DeepSeek MLA files store ``kv_b_proj`` as ``attn_k_b`` + ``attn_v_b`` (older files: ``attn_kv_b``);
- HF parameters without a ``.weight``/``.bias`` suffix (``e_score_correction_bias``, ``sinks``,
  ``gate_up_proj_bias``) are looked up with the suffix the converter gives them.
"""

from __future__ import annotations

from torch import nn

from ktinject.errors import WeightError
from ktinject.weights.layouts import (
    Concat,
    Direct,
    Interleave,
    Layout,
    MlaKvB,
    Recipe,
    Transpose,
    UnpermuteRope,
    Unresolved,
)


def model_arch(arch_name: str, where: str):
    """gguf-py's ``MODEL_ARCH`` for a ``general.architecture`` string; WeightError if gguf-py has none."""
    import gguf

    for arch, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch_name:
            return arch
    raise WeightError(
        f"{where}: architecture {arch_name!r} is not known to gguf-py {getattr(gguf, '__version__', '')}".rstrip()
    )


def _split_suffix(name: str) -> tuple[str, tuple[str, ...]]:
    """``(base, candidate GGUF suffixes)``: ``x.weight`` -> ``(x, (.weight,))``, ``x_bias`` -> ``(x, (.bias,))``."""
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)], (suffix,)
    if name.endswith("_bias"):
        return name[: -len("_bias")], (".bias",)
    return name, (".weight", "")


class GGUFNaming:
    """Recipes for one model against one GGUF file set."""

    def __init__(
        self, arch_name: str, model: nn.Module, stored: set[str], where: str, *, block_count: int | None
    ) -> None:
        import gguf

        self._gguf = gguf
        self.arch_name = arch_name
        self.arch = model_arch(arch_name, where)
        config = getattr(model, "config", None)
        layers = int(getattr(config, "num_hidden_layers", 0) or 0)
        self.map = gguf.get_tensor_name_map(self.arch, max(layers, int(block_count or 0)))
        self.stored = stored
        self.heads = int(getattr(config, "num_attention_heads", 0) or 0)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        # Experts modules whose HF tensors are transposed / gate-up interleaved (GPT-OSS), by module name.
        self.experts_flags: dict[str, tuple[bool, bool]] = {}
        for module_name, module in model.named_modules():
            gate_up = getattr(module, "gate_up_proj", None)
            if gate_up is not None and getattr(gate_up, "dim", lambda: 0)() == 3:
                self.experts_flags[module_name] = (
                    bool(getattr(module, "is_transposed", False)),
                    not bool(getattr(module, "is_concatenated", True)),
                )

    # -- helpers -----------------------------------------------------------------------------------
    def _find(self, gguf_base: str, suffixes: tuple[str, ...]) -> str | None:
        for suffix in suffixes:
            if gguf_base + suffix in self.stored:
                return gguf_base + suffix
        return None

    def _missing(self, name: str, wanted: list[str]) -> Unresolved:
        return Unresolved(name, "missing " + " and ".join(wanted))

    def _no_name(self, name: str, what: str = "it") -> Unresolved:
        return Unresolved(name, f"gguf-py's name map for architecture '{self.arch_name}' has no GGUF name for {what}")

    # -- the recipe for one HF name ------------------------------------------------------------------
    def recipe(self, name: str) -> Recipe | Unresolved:
        base, suffixes = _split_suffix(name)
        module_name, _, leaf = base.rpartition(".")
        if module_name in self.experts_flags and leaf in ("gate_up_proj", "down_proj"):
            return self._experts(name, module_name, leaf, suffixes[0])
        mapped = self.map.get_type_and_name(base)
        if mapped is None and suffixes == (".bias",):  # an HF name that merely ends in "_bias"
            base, suffixes = name, (".weight", "")
            mapped = self.map.get_type_and_name(base)
        if mapped is None:
            return self._no_name(name)
        tensor_type, gguf_base = mapped
        T = self._gguf.MODEL_TENSOR
        if tensor_type == T.ATTN_KV_B and self._find(gguf_base, suffixes) is None:
            return self._mla_kv_b(name, base, gguf_base, suffixes)
        stored = self._find(gguf_base, suffixes)
        if stored is None:
            reason = self._missing(name, [gguf_base + suffixes[0]])
            if tensor_type == T.OUTPUT and self._find(
                self.map.get_name("model.embed_tokens") or "token_embd", (".weight",)
            ):
                reason = Unresolved(
                    name,
                    reason.reason + " (the file has only token_embd.weight: tied embeddings? "
                    f"the config says tie_word_embeddings={self.tied})",
                )
            return reason
        layout: Layout = Direct()
        if self.arch == self._gguf.MODEL_ARCH.LLAMA and tensor_type in (T.ATTN_Q, T.ATTN_K):
            layout = UnpermuteRope(self.heads if tensor_type == T.ATTN_Q else self.kv_heads)
        return Recipe(name, (stored,), layout)

    def _experts(self, name: str, module_name: str, leaf: str, suffix: str) -> Recipe | Unresolved:
        transposed, interleaved = self.experts_flags[module_name]
        is_weight = suffix != ".bias"
        suffix = ".weight" if is_weight else ".bias"
        prefix = module_name + "."
        if leaf == "down_proj":
            gguf_base = self.map.get_name(prefix + "down_proj")
            if gguf_base is None:
                return self._no_name(name, "the experts' down projection")
            stored = self._find(gguf_base, (suffix,))
            if stored is None:
                return self._missing(name, [gguf_base + suffix])
            return Recipe(name, (stored,), Transpose() if transposed and is_weight else Direct())
        fused = self.map.get_name(prefix + "gate_up_proj")
        if fused is not None and not (transposed or interleaved) and self._find(fused, (suffix,)):
            return Recipe(name, (fused + suffix,), Direct())
        gate, up = self.map.get_name(prefix + "gate_proj"), self.map.get_name(prefix + "up_proj")
        if gate is None or up is None:
            return self._no_name(name, "the experts' gate/up projections")
        wanted = [gate + suffix, up + suffix]
        missing = [w for w in wanted if w not in self.stored]
        if missing:
            return self._missing(name, missing)
        if interleaved:
            return Recipe(name, tuple(wanted), Interleave(transpose=is_weight))
        if transposed:
            return Unresolved(name, "transposed experts without gate/up interleaving are not a known GGUF layout")
        return Recipe(name, tuple(wanted), Concat(dim=1))

    def _mla_kv_b(self, name: str, base: str, gguf_base: str, suffixes: tuple[str, ...]) -> Recipe | Unresolved:
        # llama.cpp's converter names the two halves k_b_proj / v_b_proj before mapping them.
        module = base.rpartition(".")[0]
        k_base, v_base = self.map.get_name(module + ".k_b_proj"), self.map.get_name(module + ".v_b_proj")
        if k_base is None or v_base is None:
            return self._missing(name, [gguf_base + suffixes[0]])
        k, v = self._find(k_base, suffixes), self._find(v_base, suffixes)
        if k is None or v is None:
            return Unresolved(
                name, f"missing {gguf_base}{suffixes[0]} (or {k_base}{suffixes[0]} and {v_base}{suffixes[0]})"
            )
        return Recipe(name, (k, v), MlaKvB())
