"""Checks over a whole GGUF model (every file of a split set): the split keys, the block numbers and the
tensor names agree with each other and with the metadata.

Each file's own header and tensor index are checked when it is opened (``gguf_reader``); these checks need
all of them: a split set whose ``split.tensors.count`` differs from the tensors found lost or gained an index
entry, a ``block_count`` that disagrees with the ``blk.N`` tensors would drop layers or leave some without
weights, and a tensor name the architecture does not have is a damaged name that would otherwise read as an
absent tensor.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ktinject.errors import WeightError
from ktinject.weights.gguf_metadata import GGUFMetadata

_BLOCK = re.compile(r"^blk\.(\d+)\.")


def check_splits(readers: list[Any], files: list[Path], total: int) -> None:
    """The ``split.*`` keys of a split set agree with the files found and the tensors they hold."""
    if len(files) < 2:
        return
    for no, (reader, file) in enumerate(zip(readers, files)):
        meta = GGUFMetadata(reader.fields, str(file))
        if "split.no" in meta and meta.integer("split.no", minimum=0) != no:
            raise WeightError(
                f"{file}: GGUF metadata key split.no is {meta.value('split.no')}, but the file is "
                f"split {no + 1} of {len(files)} (split.no counts from 0)"
            )
        count = meta.integer("split.count", None)
        if count is not None and count != len(files):
            raise WeightError(f"{file}: the metadata says {count} splits (split.count), found {len(files)} files")
        tensors = meta.integer("split.tensors.count", None, minimum=0)
        if tensors is not None and tensors != total:
            raise WeightError(
                f"{file}: GGUF metadata key split.tensors.count is {tensors}, but the {len(files)} files "
                f"hold {total} tensors; a tensor count or index is wrong"
            )


def check_blocks(meta: GGUFMetadata, names: list[str]) -> None:
    """``{arch}.block_count`` agrees with the ``blk.N.*`` tensors: every block 0..N-1 has tensors, none beyond.

    A block count that says fewer layers than the file has would silently drop the others; more would leave
    layers without weights.
    """
    count = meta.integer("{arch}.block_count", None)
    if count is None:
        return
    blocks: dict[int, str] = {}
    for name in names:
        if m := _BLOCK.match(name):
            blocks.setdefault(int(m[1]), name)
    beyond = sorted(b for b in blocks if b >= count)
    if beyond:
        raise WeightError(
            f"{meta.where}: GGUF metadata key {meta.key('{arch}.block_count')} is {count}, but the file "
            f"has tensors of block {beyond[-1]} ({blocks[beyond[-1]]}); blocks are numbered 0 to {count - 1}"
        )
    if len(blocks) < count:  # some block below count has no tensor; the first ones are below len(blocks) + 4
        empty = [b for b in range(min(count, len(blocks) + 4)) if b not in blocks]
        more = count - len(blocks) - len(empty)
        shown = ", ".join(f"blk.{b}" for b in empty) + (f" and {more} more" if more else "")
        raise WeightError(
            f"{meta.where}: GGUF metadata key {meta.key('{arch}.block_count')} is {count}, but the file "
            f"has no tensors of {shown}"
        )


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(version unknown)"


def check_names(meta: GGUFMetadata, names: list[str]) -> None:
    """Every tensor has a name gguf-py's tables give the architecture (``blk.{bid}.attn_q`` + ``.weight``...).

    llama.cpp refuses a file with tensors its architecture does not create; a tensor whose name was damaged
    would otherwise read as "absent" (an output projection silently tied to the embedding, a GLM attention
    built without its biases).
    """
    import gguf

    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == meta.arch), None)
    if arch is None:
        return  # not an architecture gguf-py knows: binding to a model says so
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS.get(arch, ())}
    for name in names:
        base = name.removesuffix(".weight") if name.endswith(".weight") else name.removesuffix(".bias")
        if _BLOCK.sub("blk.{bid}.", base) not in known:
            raise WeightError(
                f"{meta.where}: tensor {name!r} is not a tensor of the {meta.arch} architecture in "
                f"gguf-py {_gguf_version()} (a damaged name, or a file newer than gguf-py)"
            )
