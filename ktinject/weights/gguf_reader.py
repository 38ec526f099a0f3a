"""Open one GGUF file with gguf-py's ``GGUFReader`` and check its tensor index the way llama.cpp does.

gguf-py parses; the checks are ours. gguf-py trusts the file: a tensor whose offset points into another
tensor, a type changed to one of another size, or a tensor count lowered by one all parse, and the weights
come out as garbage. llama.cpp refuses such files, and so do we, with the same rules:

- every read stays inside the file, and a count or array length read from the header must fit in the bytes
  left (gguf-py would otherwise loop until memory runs out on a damaged length);
- tensor names are at most 63 bytes and unique; at most 4 dimensions, none negative, the element count fits
  in int64; the GGML type is one gguf-py knows, with a nonzero block size, and the first dimension is a
  multiple of the type's block;
- each tensor's data offset is a multiple of ``general.alignment`` and equals the running size of the tensors
  before it, each padded to the alignment (so no two tensors overlap and none skips bytes);
- every tensor's data lies inside the file, and the file ends with the padded data of the last tensor
  (extra bytes mean the tensor count or index is wrong);
- the padding before the data section and after each tensor is zeros, as GGUF writers leave it (llama.cpp
  does not look: a tensor whose type shrank it within its aligned slot passes every rule above).

Anything gguf-py itself trips over (bad magic or version, a truncated header, invalid UTF-8 in a key or a
tensor name, duplicate keys) becomes a ``WeightError`` naming the file, as do our own findings.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np

from ktinject.errors import KtInjectError, WeightError

MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64, including the terminating zero
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
_INT64_MAX = 2**63 - 1


class _IndexError(Exception):
    """What the checked reader found wrong (turned into a WeightError naming the file by :func:`open_gguf`)."""


def _least_item_bytes(value_type: int) -> int:
    """The fewest bytes one array item of GGUF value type ``value_type`` takes (0: an unknown type)."""
    from gguf import GGUFReader, GGUFValueType

    try:
        kind = GGUFValueType(value_type)
    except ValueError:
        return 0
    if kind == GGUFValueType.STRING:
        return 8
    if kind == GGUFValueType.ARRAY:
        return 4 + 8
    scalar = GGUFReader.gguf_scalar_to_np.get(kind)
    return np.dtype(scalar).itemsize if scalar is not None else 0


# gguf-py's reader methods the checks hook into (internal to gguf-py: a version that renames them must fail
# loudly here, not load files unchecked).
_HOOKS = ("_get", "_get_field_parts", "_build_fields", "_build_tensor_info", "_build_tensors")


@functools.lru_cache(maxsize=1)
def _reader_class():
    from gguf import GGUFReader, GGUFValueType

    missing = [name for name in _HOOKS if not callable(getattr(GGUFReader, name, None))]
    if missing:
        raise KtInjectError(
            f"the installed gguf-py's GGUFReader has no {', '.join(missing)}, which ktinject's GGUF "
            "checks extend; install a gguf version ktinject supports"
        )

    class CheckedReader(GGUFReader):
        """GGUFReader with bounded reads and llama.cpp's tensor index rules (see the module docstring)."""

        def _get(self, offset: int, dtype, count: int = 1, override_order=None):
            count, offset = int(count), int(offset)
            end = offset + np.dtype(dtype).itemsize * count
            if count < 0 or end > len(self.data):
                raise _IndexError(
                    f"the header reads {count} x {np.dtype(dtype).name} at byte {offset}, "
                    f"past the end of the file ({len(self.data)} bytes); the file is truncated or corrupt"
                )
            return super()._get(offset, dtype, count, override_order)

        def _get_field_parts(self, orig_offs: int, raw_type: int):
            if int(raw_type) == GGUFValueType.ARRAY:
                item_type = int(self._get(orig_offs, np.uint32)[0])
                length = int(self._get(orig_offs + 4, np.uint64)[0])
                least = _least_item_bytes(item_type)
                if least == 0:
                    raise _IndexError(f"an array at byte {orig_offs} has items of unknown value type {item_type}")
                left = len(self.data) - orig_offs - 12
                if length * least > left:
                    raise _IndexError(
                        f"an array at byte {orig_offs} claims {length} items, but only {left} bytes follow; "
                        "the file is truncated or corrupt"
                    )
            return super()._get_field_parts(orig_offs, raw_type)

        def _build_fields(self, offs: int, count: int) -> int:
            _fits(int(count), _MIN_KV_BYTES, len(self.data) - offs, "metadata key/value pairs")
            return super()._build_fields(offs, count)

        def _build_tensor_info(self, offs: int, count: int):
            _fits(int(count), _MIN_TENSOR_INFO_BYTES, len(self.data) - offs, "tensors")
            end, fields = super()._build_tensor_info(offs, count)
            self.index_end = int(end)
            return end, fields

        def _build_tensors(self, start_offs: int, fields) -> None:
            check_tensor_index(fields, self.index_end, int(start_offs), int(self.alignment), self.data)
            super()._build_tensors(start_offs, fields)

    return CheckedReader


def _fits(count: int, least: int, left: int, what: str) -> None:
    if count * least > left:
        raise _IndexError(
            f"the header counts {count} {what}, but only {left} bytes follow "
            f"(each takes at least {least}); the file is truncated or corrupt"
        )


def _padded(n: int, alignment: int) -> int:
    return n + (-n % alignment)


@dataclasses.dataclass(frozen=True)
class _Span:
    """Where one tensor's data is, relative to the data section."""

    name: str
    type_name: str
    start: int
    nbytes: int

    def __str__(self) -> str:
        return f"{self.name} ({self.type_name}, {self.nbytes} bytes at offset {self.start})"


def _entry(where: str, field) -> tuple[str, list[int], int]:
    """The GGML type name, shape (GGML order) and data size of one tensor index entry, checked."""
    import gguf

    _name_len, name_data, n_dims, dims, raw_type, _offset = field.parts
    if len(name_data) > MAX_NAME_BYTES:
        raise _IndexError(f"{where}: the name is {len(name_data)} bytes long (at most {MAX_NAME_BYTES})")
    if int(n_dims[0]) > MAX_DIMS:
        raise _IndexError(f"{where}: {int(n_dims[0])} dimensions (at most {MAX_DIMS})")
    shape = [int(d) for d in dims.tolist()]  # GGML order: shape[0] is the row length
    elements = 1
    for d in shape:
        if d > _INT64_MAX:
            raise _IndexError(f"{where}: dimension {d} is negative as a signed 64-bit number")
        elements *= d
    if elements > _INT64_MAX:
        raise _IndexError(f"{where}: shape {shape} has more than 2**63 elements")
    type_id = int(raw_type[0])
    try:
        ggml_type = gguf.GGMLQuantizationType(type_id)
        block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise _IndexError(f"{where}: GGML type {type_id} is not a type gguf-py knows") from None
    if block <= 0 or type_size <= 0:
        raise _IndexError(f"{where}: GGML type {ggml_type.name} has no block size")
    row = shape[0] if shape else 1
    if row % block:
        raise _IndexError(f"{where}: rows of {row} values do not split into {ggml_type.name} blocks of {block}")
    return ggml_type.name, shape, elements // block * type_size


def check_tensor_index(fields, index_end: int, data_start: int, alignment: int, data: np.ndarray) -> None:
    """llama.cpp's checks of the tensor index (gguf-py's raw tensor info fields, in file order), and that the
    padding before the data section and after each tensor's data is zeros, as every GGUF writer leaves it:
    a type or shape changed so that a tensor shrinks but still ends in the same aligned slot passes
    llama.cpp's offset rules, and would read part of the real data as the whole tensor.
    """
    file_size = len(data)
    if data[index_end : min(data_start, file_size)].any():
        raise _IndexError(
            f"the {min(data_start, file_size) - index_end} bytes between the end of the tensor index "
            f"(byte {index_end}) and the tensor data are not zeros; the tensor count ({len(fields)}) "
            "or the index is wrong"
        )
    expected = 0  # where the next tensor's data must start, relative to the data section
    spans: list[_Span] = []
    for field in fields:
        where = f"tensor {field.name}"
        type_name, shape, nbytes = _entry(where, field)
        start = int(field.parts[5][0])
        if start % alignment:
            raise _IndexError(f"{where}: data offset {start} is not a multiple of the alignment {alignment}")
        if start != expected:
            hit = next((s for s in spans if s.start <= start < s.start + s.nbytes), None)
            relation = (
                f"overlaps tensor {hit.name}" if hit else ("leaves a gap" if start > expected else "overlaps padding")
            )
            after = (
                f"after {spans[-1]} the next tensor starts at {expected}" if spans else "the first tensor starts at 0"
            )
            raise _IndexError(
                f"{where} ({type_name}, shape {shape}): data offset {start} {relation}; {after} "
                f"(sizes padded to {alignment} bytes): a tensor's type, shape or offset is wrong"
            )
        end = data_start + start + nbytes
        if end > file_size:
            raise _IndexError(
                f"{where} ({type_name}, shape {shape}) ends at byte {end} but the file has "
                f"{file_size} bytes; the file is truncated or the index is corrupt"
            )
        spans.append(_Span(field.name, type_name, start, nbytes))
        expected = start + _padded(nbytes, alignment)
        padding = data[end : min(data_start + expected, file_size)]
        if padding.any():
            raise _IndexError(
                f"{where} ({type_name}, shape {shape}, {nbytes} bytes): the {len(padding)} padding bytes "
                "after its data are not zeros; its type or shape does not describe the data written for it"
            )
    if spans and file_size > data_start + expected:
        extra = file_size - data_start - expected
        raise _IndexError(
            f"{extra} bytes follow the data of the last tensor ({spans[-1].name}); the tensor count "
            f"({len(spans)}) or the tensor index is wrong"
        )


def open_gguf(path: Path) -> Any:
    """A ``GGUFReader`` for ``path`` whose header and tensor index passed every check (WeightError otherwise)."""
    if not path.is_file():
        raise WeightError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    if size < 24:
        raise WeightError(f"{path}: not a GGUF file ({size} bytes; a GGUF header alone is 24)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise WeightError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    reader_class = _reader_class()
    try:
        reader = reader_class(path)
    except _IndexError as exc:
        raise WeightError(f"{path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise WeightError(
            f"{path}: a metadata key or tensor name is not valid UTF-8 ({exc.reason} at byte "
            f"{exc.start} of {exc.object[:40]!r}); the file is corrupt"
        ) from None
    except Exception as exc:  # whatever else a damaged header makes gguf-py trip over: never a crash
        raise WeightError(
            f"{path}: cannot read the GGUF header and tensor index ({type(exc).__name__}: {exc}); "
            "the file is truncated or corrupt"
        ) from None
    if reader.byte_order != "I":
        raise WeightError(f"{path}: a big-endian GGUF file; ktinject reads little-endian GGUF files only")
    return reader
