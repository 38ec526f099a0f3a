"""``SafetensorsSource``: a checkpoint directory's ``*.safetensors`` files (sharded or not) as a WeightSource.

Files are opened with ``safetensors.safe_open`` (it maps each file; tensors are views, nothing is read until
used). Checkpoint keys are mapped to the HF v5 model's names with transformers' own conversion table
(``get_model_conversion_mapping``: the renames and expert merges ``from_pretrained`` applies, e.g.
Mixtral's ``block_sparse_moe.experts.{e}.w1`` or the per-expert ``experts.{e}.gate_proj.weight`` of
Qwen/DeepSeek -> ``mlp.experts.gate_up_proj``), so a family that transformers loads is named here the same
way. Of the conversion operations we support the ones checkpoints of our families use (stacking experts,
concatenating gate and up); others are reported, per tensor, before loading starts.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

from torch import nn

from ktinject.errors import WeightError
from ktinject.weights.assembled import FileSource
from ktinject.weights.layouts import Concat, Direct, Layout, Recipe, StackConcat, Unresolved
from ktinject.weights.pages import is_file_backed
from ktinject.weights.stored import StoredTensor, TorchStoredTensor

INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, every ``*.safetensors``, or ``path`` itself."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise WeightError(f"checkpoint not found: {path}")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WeightError(f"{index}: not a safetensors index ({type(exc).__name__}: {exc})") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightError(f"{index} lists shards that do not exist: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightError(f"{path} has no *.safetensors files (give gguf=... to load a GGUF instead)")
    return files


def _open(file: Path) -> dict[str, StoredTensor]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(file), framework="pt")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types (and OSError)
        raise WeightError(f"{file}: cannot read the safetensors file ({type(exc).__name__}: {exc}); "
                          "the file is truncated or corrupt") from None
    sample = next((t for t in tensors.values() if t.numel()), None)
    backed = sample is not None and is_file_backed(sample.data_ptr(), file)
    return {key: TorchStoredTensor(key, t, file, file_backed=backed) for key, t in tensors.items()}


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    # transformers' source patterns use "*" for the expert index: "mlp.experts.*.gate_proj.weight".
    return re.compile(re.escape(pattern.lstrip("^")).replace(r"\*", r"(\d+)"))


class SafetensorsSource(FileSource):
    """Tensors of a safetensors checkpoint, named as in the HF v5 model once :meth:`bind` has seen it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        files = checkpoint_files(Path(path))
        stored: dict[str, StoredTensor] = {}
        for file in files:
            for key, tensor in _open(file).items():
                if key in stored:
                    raise WeightError(f"{file}: tensor {key} is also in {stored[key].path}")
                stored[key] = tensor
        super().__init__(files, stored)
        self._by_target: dict[str, Recipe | Unresolved] = {}

    def _prepare(self, model: nn.Module) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        targets = set(model.state_dict())
        prefix = getattr(model, "base_model_prefix", "") or ""

        plain: dict[str, list[str]] = defaultdict(list)
        merged: dict[str, tuple[object, list[tuple[int, int, str]]]] = {}
        for key in self._stored:
            renamed = key
            for renaming in renamings:
                renamed, _ = renaming.rename_source_key(renamed)
            converter, pattern, before = None, None, renamed
            for candidate in converters:
                target, matched = candidate.rename_source_key(renamed)
                if matched is not None:
                    converter, pattern, renamed = candidate, matched, target
                    break
            renamed = self._fix_prefix(renamed, prefix, targets)
            if converter is None:
                plain[renamed].append(key)
                continue
            patterns = list(converter.source_patterns)
            index_match = _pattern_regex(pattern).search(before)
            expert = int(index_match.group(1)) if index_match and index_match.groups() else 0
            merged.setdefault(renamed, (converter, []))[1].append((patterns.index(pattern), expert, key))

        recipes: dict[str, Recipe | Unresolved] = {}
        for target, keys in plain.items():
            if len(keys) == 1:
                recipes[target] = Recipe(target, (keys[0],), Direct())
            else:
                recipes[target] = Unresolved(target, f"several checkpoint keys map to it: {', '.join(keys)}")
        for target, (converter, entries) in merged.items():
            recipes[target] = self._merged_recipe(target, converter, entries)
        self._by_target = recipes

    @staticmethod
    def _fix_prefix(name: str, prefix: str, targets: set[str]) -> str:
        # Like transformers: a base-model checkpoint loads into a ForCausalLM model and the other way round.
        if not prefix or name in targets:
            return name
        if name.startswith(prefix + ".") and name[len(prefix) + 1 :] in targets:
            return name[len(prefix) + 1 :]
        if f"{prefix}.{name}" in targets:
            return f"{prefix}.{name}"
        return name

    def _merged_recipe(self, target: str, converter, entries: list[tuple[int, int, str]]) -> Recipe | Unresolved:
        from transformers.core_model_loading import Concatenate, MergeModulelist

        ops = list(converter.operations)
        patterns = list(converter.source_patterns)
        layout: Layout | None = None
        if len(ops) == 1 and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0:
            layout = StackConcat(groups=len(patterns))
        elif len(ops) == 2 and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0 and isinstance(ops[1], Concatenate) and ops[1].dim >= 1:
            layout = StackConcat(groups=len(patterns), dim=ops[1].dim - 1)
        elif len(ops) == 1 and isinstance(ops[0], Concatenate):
            layout = Concat(ops[0].dim)
        if layout is None:
            names = ", ".join(type(op).__name__ for op in ops)
            return Unresolved(target, f"the checkpoint needs transformers' conversion [{names}], which ktinject's loader does not support")
        entries.sort()
        if isinstance(layout, StackConcat):
            by_group: dict[int, list[int]] = defaultdict(list)
            for group, expert, _ in entries:
                by_group[group].append(expert)
            count = max(max(experts) + 1 for experts in by_group.values())
            target_pattern = converter.target_patterns[0].lstrip("^")
            at = target.rfind(target_pattern)
            prefix = target[:at] if at > 0 else ""  # "model.layers.2." for pattern "mlp.experts.*.up_proj.weight"
            missing = []
            for group, pattern in enumerate(patterns):
                have = set(by_group.get(group, []))
                missing += [prefix + pattern.lstrip("^").replace("*", str(e)) for e in range(count) if e not in have]
            if missing:
                shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
                return Unresolved(target, f"missing per-expert tensors {shown}")
        return Recipe(target, tuple(key for _, _, key in entries), layout)

    def _recipe(self, name: str) -> Recipe | Unresolved:
        recipe = self._by_target.get(name)
        if recipe is None:
            return Unresolved(name, "no checkpoint key maps to it (after transformers' renames for this model)")
        return recipe
