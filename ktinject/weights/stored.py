"""One tensor as it is stored in a weight file: raw view, dequantized rows, page release.

Both file sources describe their tensors with :class:`StoredTensor`; the assembly code (``layouts``) only
reads rows through it, a chunk at a time, so a large tensor is never dequantized whole into float32.
"""

from __future__ import annotations

import abc
import warnings
from pathlib import Path

import numpy as np
import torch

from ktinject.errors import WeightError
from ktinject.weights.pages import drop_pages
from ktinject.weights.source import RawTensor, raw_from_torch


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    # Mapped files are opened read-only; torch warns about that on every wrap, though we only read.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


class StoredTensor(abc.ABC):
    """A tensor in a file: its logical shape (numpy order) and how to read it."""

    name: str
    path: Path
    shape: tuple[int, ...]
    nbytes: int

    @property
    def num_rows(self) -> int:
        """Rows along the first axis (the unit in which it is read and released)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // max(self.num_rows, 1)

    @property
    @abc.abstractmethod
    def type_name(self) -> str:
        """``Q4_K``, ``F16``, ``bfloat16``... for messages and ``TensorInfo``."""

    @property
    @abc.abstractmethod
    def dequantizable(self) -> bool:
        """Whether ``rows()`` can produce float values for this stored type."""

    @property
    @abc.abstractmethod
    def float_dtype(self) -> torch.dtype:
        """The dtype ``rows()`` returns (float32 for quantized types)."""

    @abc.abstractmethod
    def raw(self) -> RawTensor:
        """The whole tensor as stored (zero-copy)."""

    @abc.abstractmethod
    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` dequantized (a view of the file for float types, a new array otherwise)."""

    @abc.abstractmethod
    def release(self, start: int, stop: int) -> None:
        """Drop the file pages of rows ``[start, stop)`` from this process's RSS (data stays valid)."""


class GGUFStoredTensor(StoredTensor):
    """A tensor of a GGUF file, read through gguf-py's reader (mmap) and dequantizers."""

    def __init__(self, reader_tensor, path: Path) -> None:
        import gguf

        self.name = reader_tensor.name
        self.path = path
        self.ggml_type = gguf.GGMLQuantizationType(int(reader_tensor.tensor_type))
        self.shape = tuple(int(d) for d in reversed(reader_tensor.shape.tolist()))
        self.nbytes = int(reader_tensor.n_bytes)
        data = np.asarray(reader_tensor.data)  # typed array, or uint8 blocks [..., row_bytes]
        # gguf-py views carry byte-order-tagged dtype objects; hand out numpy's canonical ones (C++ bindings
        # compare dtypes by identity), still as zero-copy views of the mapped file.
        self._data: np.ndarray = data.view(np.dtype(data.dtype.char))
        if not self.shape:
            self._data = self._data.reshape(1)

    @property
    def type_name(self) -> str:
        return self.ggml_type.name

    @property
    def dequantizable(self) -> bool:
        import gguf
        from gguf import quants

        t = self.ggml_type
        if t in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            return True
        if t in (
            gguf.GGMLQuantizationType.I8,
            gguf.GGMLQuantizationType.I16,
            gguf.GGMLQuantizationType.I32,
            gguf.GGMLQuantizationType.I64,
            gguf.GGMLQuantizationType.F64,
        ):
            return False
        return isinstance(getattr(quants, t.name, None), type)  # gguf-py has one class per type it can read

    @property
    def float_dtype(self) -> torch.dtype:
        import gguf

        return torch.float16 if self.ggml_type == gguf.GGMLQuantizationType.F16 else torch.float32

    def raw(self) -> RawTensor:
        data = self._data if self.shape else self._data.reshape(())
        return RawTensor(self.name, int(self.ggml_type), self.shape, data)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        import gguf
        from gguf import quants

        block = self._data[start:stop]
        if self.ggml_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):  # the typed view itself
            return _from_numpy(block)
        if not self.dequantizable:
            raise WeightError(
                f"{self.path}: tensor {self.name!r} has type {self.type_name}, which gguf-py cannot dequantize"
            )
        return _from_numpy(quants.dequantize(block, self.ggml_type))

    def release(self, start: int, stop: int) -> None:
        block = self._data[start:stop]
        drop_pages(block.ctypes.data, block.nbytes)


_TORCH_TYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


class TorchStoredTensor(StoredTensor):
    """A tensor of a safetensors file: ``safe_open(...).get_tensor`` maps the file, we keep that view."""

    def __init__(self, name: str, tensor: torch.Tensor, path: Path, *, file_backed: bool) -> None:
        self.name = name
        self.path = path
        self._tensor = tensor
        self.shape = tuple(tensor.shape)
        self.nbytes = tensor.numel() * tensor.element_size()
        self._file_backed = file_backed

    @property
    def type_name(self) -> str:
        return _TORCH_TYPE_NAMES.get(self._tensor.dtype, str(self._tensor.dtype).removeprefix("torch."))

    @property
    def dequantizable(self) -> bool:
        return self._tensor.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)

    @property
    def float_dtype(self) -> torch.dtype:
        return self._tensor.dtype

    def raw(self) -> RawTensor:
        return raw_from_torch(self.name, self._tensor)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if not self.dequantizable:
            raise WeightError(
                f"{self.path}: tensor {self.name!r} is stored as {self.type_name}, which ktinject cannot convert "
                "(quantized safetensors checkpoints such as FP8 need dequantizing first, or load a GGUF)"
            )
        return self._tensor[start:stop] if self.shape else self._tensor.reshape(1)

    def release(self, start: int, stop: int) -> None:
        if self._file_backed and self.shape:
            rows = self._tensor[start:stop]
            drop_pages(rows.data_ptr(), rows.numel() * rows.element_size())


def float_dtype_of(parts: list[StoredTensor]) -> torch.dtype:
    """The dtype a tensor assembled from ``parts`` gets when the caller asks for none: the stored float type
    when all parts share it, float32 otherwise."""
    dtypes = {p.float_dtype for p in parts}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32
