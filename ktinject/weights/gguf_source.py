"""``GGUFSource``: a GGUF model (one file or ``-00001-of-0000N.gguf`` splits) as a WeightSource.

Files are read with gguf-py's ``GGUFReader`` (mmap; header and tensor index only, no tensor data is touched
when opening) and checked as llama.cpp checks them (``gguf_reader``): any damage (wrong magic, truncated
header, a tensor index whose offsets, types or count do not add up, a missing split, a block count that
disagrees with the tensors) is a ``WeightError`` naming the file, never a crash deep in numpy nor weights
read from the wrong bytes. Metadata values are type- and range-checked when used (``gguf_metadata``).
HF names are mapped to GGUF names by ``gguf_names`` when the source is bound to a model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from ktinject.errors import WeightError
from ktinject.weights.assembled import FileSource
from ktinject.weights.gguf_file_checks import check_blocks, check_names, check_splits
from ktinject.weights.gguf_metadata import GGUFMetadata
from ktinject.weights.gguf_names import GGUFNaming
from ktinject.weights.gguf_reader import open_gguf
from ktinject.weights.stored import GGUFStoredTensor, StoredTensor

_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_paths(path: Path) -> list[Path]:
    """All files of a GGUF model given any one of them: the splits in order, or just ``path``."""
    m = _SPLIT.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    files = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise WeightError(
            f"{path}: split GGUF of {count} files, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
        )
    return files


class GGUFSource(FileSource):
    """Tensors of a GGUF model, named as in the HF model once :meth:`bind` has seen the model."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        files = split_paths(Path(path))
        readers = [open_gguf(f) for f in files]
        stored: dict[str, StoredTensor] = {}
        for reader, file in zip(readers, files):
            for t in reader.tensors:
                if t.name in stored:
                    raise WeightError(f"{file}: tensor {t.name} is also in {stored[t.name].path}")
                stored[t.name] = GGUFStoredTensor(t, file)
        super().__init__(files, stored)
        check_splits(readers, files, len(stored))
        # Later files repeat only the split.* keys; the first file's value wins.
        self.meta = GGUFMetadata(
            {key: field for reader in reversed(readers) for key, field in reader.fields.items()}, self.description
        )
        arch = self.meta.text("general.architecture", None)
        if arch is None:
            raise WeightError(f"{files[0]}: no general.architecture in the GGUF metadata")
        self.architecture: str = arch
        self.meta.arch = arch
        check_blocks(self.meta, list(stored))
        check_names(self.meta, list(stored))
        self._naming: GGUFNaming | None = None

    def metadata(self, key: str, default: Any = ...) -> Any:
        """A metadata value (``{arch}`` in ``key`` is replaced by the architecture); KeyError without default.

        Decoded safely but not type-checked: use :attr:`meta` (:class:`GGUFMetadata`) for checked values.
        """
        if key not in self.meta:
            if default is ...:
                raise KeyError(self.meta.key(key))
            return default
        return self.meta.value(key)

    def _prepare(self, model: nn.Module) -> None:
        self._naming = GGUFNaming(
            self.architecture,
            model,
            set(self._stored),
            self.description,
            block_count=self.meta.integer("{arch}.block_count", None),
        )

    def _recipe(self, name: str):
        if self._naming is None:
            raise WeightError(f"{self.description}: bind the source to a model before asking for {name}")
        return self._naming.recipe(name)
