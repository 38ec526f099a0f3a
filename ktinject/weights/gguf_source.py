"""``GGUFSource``: a GGUF model (one file or ``-00001-of-0000N.gguf`` splits) as a WeightSource.

Files are read with gguf-py's ``GGUFReader`` (mmap; header and tensor index only, no tensor data is touched
when opening). Any damage a reader can meet (wrong magic, truncated header, tensor data past the end of
the file, a missing split) is a ``WeightError`` naming the file, never a crash deep in numpy.
HF names are mapped to GGUF names by ``gguf_names`` when the source is bound to a model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ktinject.errors import WeightError
from ktinject.weights.assembled import FileSource
from ktinject.weights.gguf_names import GGUFNaming
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
        raise WeightError(f"{path}: split GGUF of {count} files, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
    return files


def _open_reader(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise WeightError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    if size < 24:
        raise WeightError(f"{path}: not a GGUF file ({size} bytes; a GGUF header alone is 24)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise WeightError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # whatever a damaged header makes the reader trip over: never a crash
        raise WeightError(f"{path}: cannot read the GGUF header and tensor index ({type(exc).__name__}: {exc}); "
                          "the file is truncated or corrupt") from None
    if reader.byte_order != "I":
        raise WeightError(f"{path}: a big-endian GGUF file; ktinject reads little-endian GGUF files only")
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise WeightError(f"{path}: tensor {t.name} ends at byte {end} but the file has {size} bytes; "
                              "the file is truncated")
    return reader


def _value(field) -> Any:
    """A GGUF metadata field as a Python value (str, int, float, bool or list)."""
    from gguf import GGUFValueType

    value = field.contents()
    kind = field.types[0] if field.types else None
    if kind == GGUFValueType.BOOL:
        return bool(value)
    if kind == GGUFValueType.FLOAT32:  # 1e-6 was stored as float32: give back 1e-06, not 9.99999997e-07
        return float(str(np.float32(value)))
    return value


class GGUFSource(FileSource):
    """Tensors of a GGUF model, named as in the HF model once :meth:`bind` has seen the model."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        files = split_paths(Path(path))
        readers = [_open_reader(f) for f in files]
        stored: dict[str, StoredTensor] = {}
        for reader, file in zip(readers, files):
            for t in reader.tensors:
                if t.name in stored:
                    raise WeightError(f"{file}: tensor {t.name} is also in {stored[t.name].path}")
                stored[t.name] = GGUFStoredTensor(t, file)
        super().__init__(files, stored)
        self._metadata = {key: field for reader in reversed(readers) for key, field in reader.fields.items()}
        arch = self.metadata("general.architecture")
        if not isinstance(arch, str):
            raise WeightError(f"{files[0]}: no general.architecture in the GGUF metadata")
        self.architecture: str = arch
        count = self.metadata("split.count", None)
        if count is not None and int(count) != len(files):
            raise WeightError(f"{files[0]}: the metadata says {count} splits, found {len(files)} files")
        self._naming: GGUFNaming | None = None

    def metadata(self, key: str, default: Any = ...) -> Any:
        """A metadata value (``{arch}`` in ``key`` is replaced by the architecture); KeyError without default."""
        key = key.replace("{arch}", getattr(self, "architecture", ""))
        field = self._metadata.get(key)
        if field is None:
            if default is ...:
                raise KeyError(key)
            return default
        return _value(field)

    def _prepare(self, model: nn.Module) -> None:
        self._naming = GGUFNaming(self.architecture, model, set(self._stored), self.description,
                                  block_count=self.metadata("{arch}.block_count", None))

    def _recipe(self, name: str):
        if self._naming is None:
            raise WeightError(f"{self.description}: bind the source to a model before asking for {name}")
        return self._naming.recipe(name)
