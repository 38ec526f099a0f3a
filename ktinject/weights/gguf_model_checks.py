"""The config read from GGUF metadata, checked against itself and against the tensors the file holds.

Each value was range-checked as it was read (``gguf_metadata``); what is left are the relations between
values and tensors that, when broken, make transformers build a model that fails at the first forward or,
worse, runs and computes garbage: experts used vs experts there, heads that do not divide, an expert count
no expert tensor has (DeepSeek/GLM allocate a buffer of that size while the model is built), a vocabulary
or hidden size the embedding disagrees with, and an output projection treated as tied when the family never
ties it. Each failure is a ``WeightError`` naming the file, the metadata key and the tensor. Last,
:func:`check_shapes_on_meta` builds the described model on the meta device and compares every tensor the
file has with it, so no size the metadata claims is ever allocated before it matched a tensor.
Layer counts and tensor names are checked when the file is opened (``gguf_file_checks``).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from ktinject.errors import WeightError

logger = logging.getLogger(__name__)

# GGUF architectures whose llama.cpp loader uses token_embd.weight as the output projection when the file
# has no output.weight (tied embeddings). DeepSeek-V2/V3 and GPT-OSS files must have their own.
TYING_ARCHITECTURES = frozenset({"llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "glm4moe"})

_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
_PER_EXPERT = re.compile(r"^blk\.\d+\.(ffn_\w+_exps|ffn_gate_inp|exp_probs_b)\.")


class _Checker:
    def __init__(self, fields: dict[str, Any], model_type: str, source) -> None:
        self.fields = fields
        self.model_type = model_type
        self.source = source
        self.meta = source.meta
        self.where = source.description

    def key(self, key: str) -> str:
        return self.meta.key("{arch}." + key)

    def fail(self, message: str) -> None:
        raise WeightError(f"{self.where}: {message}")

    def shape(self, name: str) -> tuple[int, ...] | None:
        return tuple(self.source.stored(name).shape) if name in self.source.stored_names() else None

    # -- the checks --------------------------------------------------------------------------------------
    def heads(self) -> None:
        f = self.fields
        heads, kv = f["num_attention_heads"], f["num_key_value_heads"]
        if heads % kv:
            self.fail(
                f"{self.key('attention.head_count')} is {heads}, which {self.key('attention.head_count_kv')} = {kv} "
                "does not divide (each key/value head serves a whole group of query heads)"
            )
        value_length = self.meta.integer("{arch}.attention.value_length", None)
        if f.get("head_dim") and value_length is not None and value_length != f["head_dim"]:
            self.fail(
                f"{self.key('attention.value_length')} is {value_length}, but {self.key('attention.key_length')} "
                f"is {f['head_dim']}; {self.model_type} models have one head size for keys and values"
            )
        if not f.get("head_dim") and self.model_type not in ("deepseek_v3", "deepseek_v2") and f["hidden_size"] % heads:
            self.fail(
                f"{self.key('embedding_length')} is {f['hidden_size']}, which {self.key('attention.head_count')} = "
                f"{heads} does not divide, and no {self.key('attention.key_length')} gives the head size"
            )

    def experts(self) -> None:
        f = self.fields
        key = next((k for k in _EXPERT_KEYS if k in f), None)
        if key is None:
            return
        count, used = f[key], f["num_experts_per_tok"]
        if used > count:
            self.fail(
                f"{self.key('expert_used_count')} is {used}, more than the {count} experts of "
                f"{self.key('expert_count')}"
            )
        for name in self.source.stored_names():
            if _PER_EXPERT.match(name):
                shape = self.source.stored(name).shape
                if not shape or shape[0] != count:
                    self.fail(
                        f"{self.key('expert_count')} is {count}, but tensor {name} has shape {tuple(shape)} "
                        f"({shape[0] if shape else 'no'} experts along its first axis)"
                    )
        groups, used_groups = f.get("n_group"), f.get("topk_group")
        if groups is None:
            return
        smallest = 2 if self.model_type in ("deepseek_v3", "glm4_moe") else 1  # they rank groups by their top 2
        if count % groups or count // groups < smallest:
            self.fail(
                f"{self.key('expert_group_count')} is {groups}, which does not split the {count} experts into "
                f"equal groups of at least {smallest}"
            )
        if used_groups > groups:
            self.fail(
                f"{self.key('expert_group_used_count')} is {used_groups}, more than the {groups} groups of "
                f"{self.key('expert_group_count')}"
            )
        if used > used_groups * (count // groups):
            self.fail(
                f"{self.key('expert_used_count')} is {used}, more than the {used_groups * (count // groups)} experts "
                f"in the {used_groups} groups routing may pick ({self.key('expert_group_used_count')})"
            )

    def dense_layers(self) -> None:
        f = self.fields
        dense = f.get("first_k_dense_replace")
        if dense is not None and dense > f["num_hidden_layers"]:
            self.fail(
                f"{self.key('leading_dense_block_count')} is {dense}, more than the {f['num_hidden_layers']} layers"
            )

    def embeddings(self) -> None:
        f = self.fields
        vocab, hidden = f["vocab_size"], f["hidden_size"]
        vocab_from = self.key("vocab_size") if self.key("vocab_size") in self.meta else "the vocabulary size"
        for name in ("token_embd.weight", "output.weight"):
            shape = self.shape(name)
            if shape is None:
                continue
            if len(shape) != 2 or shape[1] != hidden:
                self.fail(
                    f"tensor {name} has shape {shape}, but {self.key('embedding_length')} is {hidden} "
                    f"(expected ({vocab}, {hidden}))"
                )
            if shape[0] != vocab:
                self.fail(f"tensor {name} has shape {shape}: {shape[0]} tokens, but {vocab_from} is {vocab}")

    def tying(self) -> None:
        if not self.fields.get("tie_word_embeddings"):
            return
        arch = self.meta.arch
        if arch not in TYING_ARCHITECTURES:
            self.fail(
                f"tensor output.weight is missing; {arch} models have their own output projection (only "
                f"{', '.join(sorted(TYING_ARCHITECTURES))} files may leave it out to tie it to token_embd.weight)"
            )
        if self.shape("token_embd.weight") is None:
            self.fail("tensors output.weight and token_embd.weight are both missing")
        moe = any(k in self.fields for k in _EXPERT_KEYS)
        # Released MoE models never tie: a missing output.weight there is more likely damage than intent.
        logger.log(
            logging.WARNING if moe else logging.INFO,
            "%s: no output.weight; lm_head is tied to token_embd.weight (as llama.cpp does for %s)",
            self.where,
            arch,
        )


def check_config_fields(fields: dict[str, Any], model_type: str, source) -> None:
    """Raise a WeightError for the first relation between config values and tensors that does not hold."""
    checker = _Checker(fields, model_type, source)
    checker.heads()
    checker.experts()
    checker.dense_layers()
    checker.embeddings()
    checker.tying()


def check_shapes_on_meta(config, source) -> None:
    """Build the model on the meta device (nothing is allocated, whatever sizes the metadata claims) and compare
    every tensor the file has with the shape the metadata gives it.

    ``from_pretrained`` builds its model with real buffers, and transformers creates each parameter on the CPU
    before moving it to meta: a size nobody checked (a 2**31 head size) is an allocation of that size. After
    this check every parameter the file backs has the file's shape. Tensors the file lacks are left to the
    loader's check, which names the rule that needs them.
    """
    import torch
    from transformers import AutoModelForCausalLM

    where = source.description
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # transformers' constructors on values it does not expect: name the file
        raise WeightError(
            f"{where}: transformers cannot build a {config.model_type} model from the GGUF metadata "
            f"({type(exc).__name__}: {exc})"
        ) from None
    source.bind(model)
    problems = []
    used: set[str] = set()
    for name, tensor in model.state_dict().items():
        if source.resolves(name):
            used.update(source.resolve(name).parts)
            problem = source.check(name, tuple(tensor.shape), dequantize=False)
            if problem is not None:
                problems.append(f"  {name}: {problem}")
    if problems:
        raise WeightError(
            f"{where}: the GGUF metadata describes a model whose tensors do not match the file's "
            f"({len(problems)} of {len(model.state_dict())}):\n" + "\n".join(problems)
        )
    unused = [n for n in source.stored_names() if n not in used]
    if unused:
        shown = ", ".join(unused[:6]) + (f" and {len(unused) - 6} more" if len(unused) > 6 else "")
        logger.warning(
            "%s: %d tensors of the file are not used by the %s model its metadata describes: %s",
            where,
            len(unused),
            config.model_type,
            shown,
        )
