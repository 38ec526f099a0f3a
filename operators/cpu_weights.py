"""Weight types of the CPU kernels (csrc/quant): names, GGML ids and sizes, and conversion to GGUF blocks.

The one place the CPU operators (``cpu_experts``, ``cpu_linear``) learn these facts. Ids and block sizes come
from gguf-py's tables (the file format's own definition; usable when planning without the extension); the
extension reads the same GGML ids, and what only the kernels decide (the column multiple) comes from their type
table (``native().weight_type_traits()``).
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Literal

import gguf
import numpy as np
import torch

from ktinject.native import native
from ktinject.weights.source import TensorInfo

WeightTypeName = Literal["auto", "q4_k", "q5_k", "q6_k", "q8_0", "bf16", "f16", "f32"]
IsaName = Literal["auto", "avx512", "avx2", "scalar"]

# The stored types the kernels read (the names ``weight_type`` takes besides ``auto``): name -> GGML type id.
GGML_TYPES: dict[str, int] = {
    name: int(gguf.GGMLQuantizationType[name.upper()]) for name in typing.get_args(WeightTypeName) if name != "auto"
}
GGML_TYPE_NAMES: dict[int, str] = {v: k for k, v in GGML_TYPES.items()}
FLOAT_STORAGE: dict[str, torch.dtype] = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DTYPE_TO_TYPE: dict[torch.dtype, str] = {v: k for k, v in FLOAT_STORAGE.items()}


def bytes_per_weight(name: str) -> float:
    """Average stored bytes per weight of type ``name`` (block bytes / block elements)."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(GGML_TYPES[name])]
    return size / block


def column_multiple(name: str) -> int:
    """Input features must be a multiple of this for ``name`` (the block size; 2 for 16-bit floats), as the
    kernels' own type table says (csrc/quant/weight_types.h): their packing decides it, not the file format."""
    return native().weight_type_traits()[name]["col_granularity"]


def float_type_of(dtype: torch.dtype) -> str | None:
    """The stored type that keeps ``dtype`` exactly (f32/f16/bf16), or None."""
    return DTYPE_TO_TYPE.get(dtype)


def to_blocks(w: torch.Tensor, wtype: str) -> np.ndarray:
    """[..., rows, cols] float tensor -> uint8 [..., rows, row_bytes] in the GGUF layout of ``wtype``
    (float types are their bytes; integer types are quantized by our quantizers)."""
    *lead, cols = w.shape
    if wtype in FLOAT_STORAGE:
        t = w.detach().to("cpu", FLOAT_STORAGE[wtype]).contiguous()
        data = t.numpy().view(np.uint8) if t.dtype == torch.float32 else t.view(torch.uint8).numpy()
        return data.reshape(*lead, -1)
    flat = np.ascontiguousarray(w.detach().to("cpu", torch.float32).numpy().reshape(-1, cols))
    return native().quantize(GGML_TYPES[wtype], flat).reshape(*lead, -1)


def kept_stored_bytes(estimate: int, weight_type: str, stored: Mapping[str, TensorInfo]) -> int:
    """What a CPU operator holds when it loads from a file that stores its tensors as ``stored`` says: their
    stored bytes when it keeps them as they are (every type one the kernels read, and ``weight_type`` auto or
    that very type), else ``estimate`` (its size after converting to ``weight_type``)."""
    types = {t.lower() for info in stored.values() for t in info.stored_type.split("+")}
    if stored and types <= set(GGML_TYPES) and (weight_type == "auto" or types == {weight_type}):
        return sum(info.stored_bytes for info in stored.values())
    return estimate


def stored_part(stored: Mapping[str, TensorInfo], part: str) -> dict[str, TensorInfo]:
    """How a file stores the tensors of the submodule ``part`` (names relative to it), from how it stores the
    whole module's: for operators built from parts (their ``estimate_stored_bytes``)."""
    prefix = part + "."
    return {name[len(prefix) :]: info for name, info in stored.items() if name.startswith(prefix)}
