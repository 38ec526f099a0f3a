"""The ``WeightSource`` interface operators load their tensors through.

Every source serves tensors named as in the HF model's ``state_dict``. What operators call:

- ``names()``: the tensors it can serve;
- ``parts(name)``: the stored tensors that make up ``name``, in HF order, as zero-copy views
  (:class:`RawTensor`; quantized blocks stay blocks). An operator that runs on the stored format (the C++
  CPU experts) reads these and never asks for a dequantized copy;
- ``tensor(name, dtype, device)``: the assembled, dequantized tensor in the exact HF layout;
- ``tensor_rows(name, start, stop, dtype)``: rows of ``tensor(name)`` (first axis: experts, output rows),
  read without the rest where the source can (default: slices the whole tensor);
- ``stored_rows(name)``: the stored data in HF row order (blocks stay blocks), or None when the file's layout
  changes rows' contents (default: the single part, if there is one);
- ``release()``: the file pages of the parts handed out so far stop counting in RSS (the views stay valid
  and read the file again if touched). An operator that copies parts in batches calls it between batches;
  the loader calls it after every ``load_weights`` (default: nothing to release).

Sources derive from :class:`WeightSource`, so the optional methods always exist and operators call them
directly. ``ModuleSource`` serves a live module (how ``optimize()`` hands an operator the weights of the
module it replaces); ``GGUFSource`` and ``SafetensorsSource`` serve files for ``ktinject.from_pretrained``
(they also answer ``info(name)``: shape, stored type and bytes, for plans made against a file).

How ``parts`` relates to the HF tensor for the fused experts of transformers v5
(``gate_up_proj [E, 2I, H]``, gate rows first; ``down_proj [E, H, I]``):

- GGUF stores ``ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps`` stacked per layer; ``parts`` of
  ``gate_up_proj`` is ``[gate_exps, up_exps]`` (each ``(E, I, H)``), of ``down_proj`` ``[down_exps]``
  (``(E, H, I)``). A file that stores a fused ``ffn_gate_up_exps`` gives that single part.
- safetensors checkpoints store experts one by one; ``parts`` of ``gate_up_proj`` is the E gate tensors,
  then the E up tensors (each ``(I, H)``), of ``down_proj`` the E down tensors.
- GPT-OSS's HF tensors are transposed and interleaved (``gate_up_proj [E, H, 2I]``, gate at even columns;
  ``down_proj [E, I, H]``). From GGUF the parts are still the canonical ``(E, I, H)`` gate and up (and
  ``(E, H, I)`` down) tensors, so a raw-parts operator sees one orientation for every family; ``tensor()``
  interleaves and transposes them into the HF layout. From safetensors the part is the HF tensor itself, and
  the operator applies the module's ``is_transposed`` flag (``torch_experts`` keeps it as
  ``_source_transposed``).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from ktinject.errors import WeightError

# numpy dtypes that are a GGML float type as they are (bfloat16 has no numpy dtype: it travels as GGML bytes).
_NUMPY_GGML_TYPES = {np.dtype(np.float32): GGMLQuantizationType.F32, np.dtype(np.float16): GGMLQuantizationType.F16}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A tensor of a weight file: shape (in the HF orientation), how it is stored and how many bytes that takes.

    ``stored_type`` is the GGML type name of the stored parts (``Q4_K``, ``F16``, ``BF16``...; several joined
    by ``+``), the same spelling for GGUF and safetensors files.
    """

    name: str
    shape: tuple[int, ...]
    stored_type: str
    stored_bytes: int


@dataclasses.dataclass(frozen=True)
class RawTensor:
    """One stored tensor exactly as it is in the file (a zero-copy view of the mapped file where possible).

    - ``stored_name``: its name in the file (``blk.3.ffn_gate_exps.weight``, ``model.layers.3...``).
    - ``ggml_type``: the GGML type id (``gguf.GGMLQuantizationType``) for GGUF tensors, and for bfloat16
      tensors of any source (numpy has no bfloat16); ``None`` for plain numpy-typed float tensors.
    - ``shape``: the logical shape in HF/numpy order (``(E, I, H)`` for ``ffn_gate_exps``).
    - ``data``: for GGML block types and bfloat16, ``uint8`` of shape ``(*shape[:-1], row_bytes)`` holding
      the blocks as stored; otherwise the typed array of ``shape`` (float32, float16, ...).

    Views stay valid while the source is alive; an operator that keeps weights copies them.
    """

    stored_name: str
    ggml_type: int | None
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def type_id(self) -> int:
        """The GGML type id of the data, also for plain float arrays (F32/F16); WeightError for others."""
        if self.ggml_type is not None:
            return self.ggml_type
        if self.data.dtype in _NUMPY_GGML_TYPES:
            return int(_NUMPY_GGML_TYPES[self.data.dtype])
        raise WeightError(f"tensor {self.stored_name!r} is stored as {self.data.dtype}, which has no GGML type")

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


class WeightSource(abc.ABC):
    """Where an operator's tensors come from (names are HF ``state_dict`` names).

    ``names``, ``parts`` and ``tensor`` are what every source must answer; ``tensor_rows``, ``stored_rows`` and
    ``release`` have defaults that are right for any source, which file sources override to read less.
    """

    @abc.abstractmethod
    def names(self) -> Iterable[str]:
        """The tensors this source serves."""

    @abc.abstractmethod
    def parts(self, name: str) -> list[RawTensor]:
        """The stored tensors that make up ``name``, in HF order (zero-copy views; blocks stay blocks)."""

    @abc.abstractmethod
    def tensor(
        self, name: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """``name`` assembled and dequantized, in the HF layout (``dtype`` None: the stored float type)."""

    def tensor_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``tensor(name)`` (first axis). Default: the whole tensor, sliced."""
        return self.tensor(name, dtype=dtype)[start:stop]

    def stored_rows(self, name: str) -> RawTensor | None:
        """``name`` as stored with its rows in the HF order, or None when no single stored tensor is that.
        Default: the only part, when there is one (a source whose one part is laid out differently from the HF
        tensor, e.g. transposed, overrides this)."""
        parts = self.parts(name)
        return parts[0] if len(parts) == 1 else None

    def release(self) -> None:
        """Drop the file pages of the parts handed out so far from RSS. Default: nothing to drop."""


def raw_from_torch(stored_name: str, tensor: torch.Tensor) -> RawTensor:
    """A CPU torch tensor as a RawTensor (zero-copy; bfloat16 becomes GGML BF16 bytes, numpy has no bfloat16)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    shape = tuple(tensor.shape)
    if tensor.dtype == torch.bfloat16:
        data = tensor.contiguous().view(torch.uint8).numpy()
        if shape:
            data = data.reshape(*shape[:-1], shape[-1] * 2)
        return RawTensor(stored_name, int(GGMLQuantizationType.BF16), shape, data)
    return RawTensor(stored_name, None, shape, tensor.numpy())


class ModuleSource(WeightSource):
    """The parameters and persistent buffers of a live module, by ``state_dict`` name."""

    def __init__(self, module: nn.Module, *, description: str = "module") -> None:
        self._tensors = {k: v for k, v in module.state_dict(keep_vars=True).items()}
        self._description = description

    def names(self) -> Iterable[str]:
        return self._tensors.keys()

    def _get(self, name: str) -> torch.Tensor:
        try:
            tensor = self._tensors[name]
        except KeyError:
            raise WeightError(f"{self._description} has no tensor {name!r} (has: {', '.join(self._tensors)})") from None
        if tensor.is_meta:
            raise WeightError(f"{self._description}: tensor {name!r} is on the meta device (no data to load)")
        return tensor.detach()

    def parts(self, name: str) -> list[RawTensor]:
        return [raw_from_torch(name, self._get(name))]

    def tensor(
        self, name: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        return self._get(name).to(device=device, dtype=dtype)

    def tensor_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._get(name)[start:stop].to(dtype=dtype)
