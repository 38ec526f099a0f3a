"""Where each header field, metadata value and tensor index entry of a GGUF file is, to damage it byte by byte.

Located with gguf-py's reader on the intact file (independent of ktinject's checks); values are written back
with ``struct`` in the stored width, so a test can change exactly one field the way a bad disk or an attacker
would: a tensor's GGML type or data offset, a header count, a metadata number.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

HEADER = {"version": (4, "uint32"), "n_tensors": (8, "uint64"), "n_kv": (16, "uint64")}
TENSOR_FIELDS = {"name_length": 0, "name": 1, "n_dims": 2, "dims": 3, "type": 4, "offset": 5}
_PACK = {
    "uint8": "<B",
    "int8": "<b",
    "uint16": "<H",
    "int16": "<h",
    "uint32": "<I",
    "int32": "<i",
    "uint64": "<Q",
    "int64": "<q",
    "float32": "<f",
    "float64": "<d",
    "bool": "<B",
}


@dataclasses.dataclass
class Part:
    """One stored field: its byte offset in the file, its size and numpy dtype name (``uint64``, ``float32``...)."""

    offset: int
    size: int
    dtype: str


@dataclasses.dataclass
class Layout:
    kvs: list[tuple[str, list[Part]]]  # key -> [key length, key bytes, value type, value parts...]
    tensors: list[tuple[str, list[Part]]]  # name -> [name length, name bytes, n_dims, dims, type, offset]
    data_start: int
    size: int

    def kv(self, key: str) -> list[Part]:
        return dict(self.kvs)[key]

    def tensor(self, name: str) -> list[Part]:
        return dict(self.tensors)[name]


def read_layout(path: Path) -> Layout:
    import gguf

    reader = gguf.GGUFReader(path)

    def parts(field) -> list[Part]:
        out, offset = [], field.offset
        for part in field.parts:
            out.append(Part(offset, int(part.nbytes), part.dtype.name))
            offset += int(part.nbytes)
        return out

    kvs = [(key, parts(field)) for key, field in reader.fields.items() if not key.startswith("GGUF.")]
    tensors = [(t.name, parts(t.field)) for t in reader.tensors]
    return Layout(kvs, tensors, int(reader.data_offset), path.stat().st_size)


def put(data: bytearray, part: Part, value) -> None:
    """Store ``value`` in ``part``'s width (integers wrap: -1 is the largest unsigned value)."""
    fmt = _PACK[part.dtype]
    if fmt[-1] in "fd":
        data[part.offset : part.offset + part.size] = struct.pack(fmt, float(value))
        return
    bits = struct.calcsize(fmt) * 8
    value = int(value) % 2**bits
    if fmt[-1].islower() and value >= 2 ** (bits - 1):
        value -= 2**bits
    data[part.offset : part.offset + part.size] = struct.pack(fmt, value)


def get(data: bytes, part: Part):
    return struct.unpack(_PACK[part.dtype], data[part.offset : part.offset + part.size])[0]


def header_part(field: str) -> Part:
    offset, dtype = HEADER[field]
    return Part(offset, 8 if dtype == "uint64" else 4, dtype)


def patch(path: Path, edit) -> None:
    """Rewrite ``path`` after ``edit(data: bytearray, layout: Layout)`` changed its bytes."""
    layout = read_layout(path)
    data = bytearray(path.read_bytes())
    edit(data, layout)
    path.write_bytes(bytes(data))


def set_tensor_field(path: Path, name: str, field: str, value) -> int:
    """Set one field of tensor ``name``'s index entry (``type``, ``offset``, ``n_dims``); returns the old value."""
    old = []

    def edit(data: bytearray, layout: Layout) -> None:
        part = layout.tensor(name)[TENSOR_FIELDS[field]]
        old.append(get(data, part))
        put(data, part, value)

    patch(path, edit)
    return old[0]


def set_metadata(path: Path, key: str, value) -> None:
    """Set the scalar value of metadata ``key`` (in its stored type)."""
    patch(path, lambda data, layout: put(data, layout.kv(key)[3], value))


def set_header(path: Path, field: str, value) -> int:
    """Set ``version``, ``n_tensors`` or ``n_kv``; returns the old value."""
    old = []

    def edit(data: bytearray, layout: Layout) -> None:
        old.append(get(data, header_part(field)))
        put(data, header_part(field), value)

    patch(path, edit)
    return old[0]


def tensor_field(path: Path, name: str, field: str):
    """The stored value of one field of tensor ``name``'s index entry."""
    return get(path.read_bytes(), read_layout(path).tensor(name)[TENSOR_FIELDS[field]])
