"""``SafetensorsSource``: a checkpoint directory's ``*.safetensors`` files (sharded or not) as a WeightSource.

Files are opened with ``safetensors.safe_open`` (it maps each file; tensors are views, nothing is read until
used). Checkpoint keys are mapped to the HF v5 model's names with transformers' own conversion table
(``get_model_conversion_mapping``: the renames and expert merges ``from_pretrained`` applies, e.g.
Mixtral's ``block_sparse_moe.experts.{e}.w1`` or the per-expert ``experts.{e}.gate_proj.weight`` of
Qwen/DeepSeek -> ``mlp.experts.gate_up_proj``), so a family that transformers loads is named here the same
way. Of the conversion operations we support the ones checkpoints of our families use (stacking experts,
concatenating gate and up); others are reported, per tensor, before loading starts.

Nothing in the files is trusted: an index must be a JSON object whose ``weight_map`` maps tensor names to
shard file names inside the checkpoint directory (``../`` and absolute paths are refused before anything is
opened), every tensor it names must be in the shard it names, and a header safetensors cannot parse is a
``WeightError`` naming the file.
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
from ktinject.weights.layouts import Concat, Direct, Layout, Recipe, StackConcat, Transpose, Unresolved
from ktinject.weights.pages import is_file_backed
from ktinject.weights.stored import StoredTensor, TorchStoredTensor

INDEX_FILE = "model.safetensors.index.json"


def _shard_path(root: Path, index: Path, name: str) -> Path:
    """The file a ``weight_map`` entry names, refusing names that would leave the checkpoint directory.

    Checked on the name itself, not on resolved links: a hub cache keeps shards as links into a blob store
    next to the snapshot, and that is the directory owner's choice; a name in the index is not.
    """
    parts = Path(name).parts
    if not name or "\0" in name or Path(name).is_absolute() or ".." in parts:
        raise WeightError(
            f"{index}: shard {name!r} is not a file name inside {root} (absolute paths and '..' are "
            "refused: an index must not make ktinject open files outside the checkpoint)"
        )
    return root / name


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a safetensors index (tensor name -> shard file name), checked for shape."""
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise WeightError(f"{index}: not a safetensors index ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or "weight_map" not in data:
        raise WeightError(
            f'{index}: not a safetensors index (expected a JSON object with a "weight_map" key, '
            f"found {type(data).__name__}{' without weight_map' if isinstance(data, dict) else ''})"
        )
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise WeightError(
            f"{index}: weight_map must be an object of tensor name -> shard file, found a {type(weight_map).__name__}"
        )
    for key, value in weight_map.items():
        if not isinstance(value, str):
            raise WeightError(f"{index}: weight_map[{key!r}] must be a shard file name, found {value!r}")
    return weight_map


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, every ``*.safetensors``, or ``path`` itself."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise WeightError(f"checkpoint not found: {path}")
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = read_index(index)
        files = [_shard_path(path, index, name) for name in dict.fromkeys(weight_map.values())]
        if not files:
            raise WeightError(f"{index}: weight_map is empty (no shards)")
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightError(f"{index} lists shards that do not exist: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightError(f"{path} has no *.safetensors files (give gguf=... to load a GGUF instead)")
    return files


def check_index_tensors(path: Path, stored: dict[str, StoredTensor]) -> None:
    """Every tensor the index names is in the shard it names (a shard cut short or swapped shows here)."""
    index = path / INDEX_FILE
    if not path.is_dir() or not index.is_file():
        return
    for key, shard in read_index(index).items():
        tensor = stored.get(key)
        if tensor is None:
            raise WeightError(f"{index}: tensor {key} is listed in {shard}, but no shard has it")
        if tensor.path != path / shard:
            raise WeightError(f"{index}: tensor {key} is listed in {shard}, but it is in {tensor.path.name}")


def _open(file: Path) -> dict[str, StoredTensor]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(file), framework="pt")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types (and OSError)
        raise WeightError(
            f"{file}: cannot read the safetensors file ({type(exc).__name__}: {exc}); the file is truncated or corrupt"
        ) from None
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
        check_index_tensors(Path(path), stored)
        super().__init__(files, stored)
        self._by_target: dict[str, Recipe | Unresolved] = {}

    def _prepare(self, model: nn.Module) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        targets = set(shapes)
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
            recipes[target] = self._merged_recipe(target, converter, entries, shapes.get(target))
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

    def _merged_recipe(
        self, target: str, converter, entries: list[tuple[int, int, str]], expected: tuple[int, ...] | None = None
    ) -> Recipe | Unresolved:
        from transformers.core_model_loading import Concatenate, MergeModulelist
        from transformers.core_model_loading import Transpose as TransposeOp

        ops = list(converter.operations)
        patterns = list(converter.source_patterns)
        layout: Layout | None = None
        if len(ops) == 1 and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0:
            layout = StackConcat(groups=len(patterns))
        elif (
            len(ops) == 2
            and isinstance(ops[0], MergeModulelist)
            and ops[0].dim == 0
            and isinstance(ops[1], Concatenate)
            and ops[1].dim >= 1
        ):
            layout = StackConcat(groups=len(patterns), dim=ops[1].dim - 1)
        elif len(ops) == 1 and isinstance(ops[0], Concatenate):
            layout = Concat(ops[0].dim)
        elif len(ops) == 1 and isinstance(ops[0], TransposeOp) and len(entries) == 1:
            # Qwen3-VL-MoE checkpoints store the experts transposed (check_dims: only when the shapes say so).
            stored = tuple(self._stored[entries[0][2]].shape)
            ndim = len(stored)
            last_two = ndim >= 2 and {ops[0].dim0 % ndim, ops[0].dim1 % ndim} == {ndim - 2, ndim - 1}
            if ops[0].check_dims and stored == expected:
                layout = Direct()
            elif last_two:
                layout = Transpose()
        if layout is None:
            names = ", ".join(type(op).__name__ for op in ops)
            return Unresolved(
                target,
                f"the checkpoint needs transformers' conversion [{names}], which ktinject's loader does not support",
            )
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
