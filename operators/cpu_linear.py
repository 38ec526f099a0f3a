"""``cpu_linear``: an ``nn.Linear`` on the CPU in our C++ kernels (csrc/linear), the dense-path twin of ``cpu_experts``.

Attention projections, dense and shared-expert MLPs and the LM head of a CPU-placed model spend decode time
streaming their weights: torch reads them as bf16/f32 through a one-row matrix-vector path, we read them as
stored (GGUF Q4_K, Q5_K, Q6_K, Q8_0 blocks or BF16/F16/F32 rows) with int8 activations and the same packed
tiles, kernels and pinned pool as the experts. A GGUF tensor is taken as stored (no float copy beside the
blocks); a live module's float weight is kept in its dtype or quantized by ``weight_type``.

Thread-safe: calls from several threads run one after the other on the pool.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch
from ktinject.operators import torch_ops
from ktinject.operators.cpu_pool import CpuOperator, CpuPoolConfig
from ktinject.operators.cpu_weights import (
    GGML_TYPE_NAMES,
    GGML_TYPES,
    bytes_per_weight,
    column_multiple,
    float_type_of,
    kept_stored_bytes,
    to_blocks,
)
from torch import nn

from ktinject.core_sharing import share_cores_with_pool
from ktinject.errors import OperatorError
from ktinject.native import native
from ktinject.operator import register_operator
from ktinject.weights.source import ModuleSource, RawTensor, WeightSource

logger = logging.getLogger("ktinject")

# Rows converted or packed per batch (bounds the temporary float32 copy of a large LM head).
_ROWS_PER_BATCH = 4096


@dataclasses.dataclass(frozen=True)
class CpuLinearConfig(CpuPoolConfig):
    """weight_type, threads, numa_nodes, isa (see CpuPoolConfig; the same pool as cpu_experts)."""


@register_operator("cpu_linear")
class CpuLinear(CpuOperator):
    """``y = x W^T + b`` on the CPU over stored blocks (C++ kernels, NUMA-pinned thread pool)."""

    Config = CpuLinearConfig
    wants_raw_weights = True  # the loader hands GGUF blocks over as stored (see load_weights)

    def __init__(
        self, in_features: int, out_features: int, has_bias: bool, *, name: str, config: CpuLinearConfig
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.has_bias = has_bias
        self.module_name = name
        self.config = config
        self._linear: Any = None  # the native layer, created once the weight type is known
        self._type: str | None = None
        self._handle = torch_ops.register(self)

    # ---- building ---------------------------------------------------------------------------------

    @classmethod
    def from_module(cls, module: nn.Module, *, name: str, device: torch.device, config: CpuLinearConfig) -> "CpuLinear":
        if device.type != "cpu":
            raise OperatorError(f"cpu_linear computes on the CPU; {name!r} is placed on {device} (use device: cpu)")
        weight = _linear_weight(module, name)
        op = cls(weight.shape[1], weight.shape[0], getattr(module, "bias", None) is not None, name=name, config=config)
        op._weight_stand_in = torch.empty(weight.shape, dtype=weight.dtype, device="meta")
        if not weight.is_meta:
            op.load_weights(ModuleSource(module, description=f"module {name!r}"), "")
        return op

    @classmethod
    def estimate_bytes(cls, module: nn.Module, config: CpuLinearConfig) -> int:
        weight = _linear_weight(module, "")
        name = config.weight_type if config.weight_type != "auto" else (float_type_of(weight.dtype) or "f32")
        bias = getattr(module, "bias", None)
        return int(weight.numel() * bytes_per_weight(name)) + (bias.numel() * 4 if bias is not None else 0)

    @classmethod
    def estimate_stored_bytes(cls, module: nn.Module, config: CpuLinearConfig, device: torch.device, stored) -> int:
        return kept_stored_bytes(cls.estimate_bytes(module, config), config.weight_type, stored)

    def _create(self, wtype: str) -> None:
        c = self.config
        if self.in_features % column_multiple(wtype):
            raise OperatorError(
                f"cpu_linear for {self.module_name!r}: in_features {self.in_features} is not a multiple of "
                f"{column_multiple(wtype)}, which {wtype} needs; choose another weight_type"
            )
        try:
            self._linear = native().Linear(
                self.out_features,
                self.in_features,
                type=GGML_TYPES[wtype],
                has_bias=self.has_bias,
                threads=c.threads,
                numa_nodes=c.numa_nodes,
                isa=c.isa,
            )
        except ValueError as exc:
            raise OperatorError(f"cpu_linear for {self.module_name!r}: {exc}") from None
        self._type = wtype
        share_cores_with_pool([c for node in self._linear.cpus for c in node])

    # ---- loading ----------------------------------------------------------------------------------

    def weight_names(self) -> list[str]:
        return ["weight", "bias"] if self.has_bias else ["weight"]

    def load_weights(self, source, prefix: str) -> None:
        """The weight as stored when the kernels read its type (and ``weight_type`` allows), else converted."""
        part = _stored_rows(source, prefix + "weight")
        stored = _kernel_type(part)
        wanted = self.config.weight_type
        if stored is not None and wanted in ("auto", stored) and self.in_features % column_multiple(stored) == 0:
            self._create(stored)
            blocks = _as_blocks(part.data, self.out_features)
            for r0 in range(0, self.out_features, _ROWS_PER_BATCH):
                self._linear.load(r0, np.ascontiguousarray(blocks[r0 : r0 + _ROWS_PER_BATCH]))
        else:
            wtype = self._convert_type(part, stored)
            self._create(wtype)
            for r0 in range(0, self.out_features, _ROWS_PER_BATCH):
                rows = _rows(source, prefix + "weight", r0, min(self.out_features, r0 + _ROWS_PER_BATCH))
                self._linear.load(r0, to_blocks(rows, wtype))
        if self.has_bias:
            self._linear.load_bias(np.ascontiguousarray(source.tensor(prefix + "bias", dtype=torch.float32).numpy()))

    def _convert_type(self, part, stored: str | None) -> str:
        """The type to convert a weight to when it cannot be taken as stored (logged: conversion is lossy or slow)."""
        wanted = self.config.weight_type
        stored_name = getattr(part, "stored_name", "?")
        if wanted != "auto":
            if stored not in (None, "f32", "f16", "bf16"):  # quantizing floats is what weight_type asks for
                logger.warning(
                    "cpu_linear %s: weight_type=%s but %s is stored as %s; converting (dequantize + "
                    "quantize: slow and lossy)",
                    self.module_name,
                    wanted,
                    stored_name,
                    stored,
                )
            return wanted
        if part is not None and part.ggml_type is None and part.data.dtype in (np.float32, np.float16):
            return "f32" if part.data.dtype == np.float32 else "f16"
        logger.warning(
            "cpu_linear %s: %s is stored in a type the CPU kernels do not read; converting to q8_0",
            self.module_name,
            stored_name,
        )
        return "q8_0" if self.in_features % 32 == 0 else "f32"

    # ---- running ----------------------------------------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        """The replaced weight's shape and dtype, holding no data (``meta``): transformers code reads
        ``proj.weight.dtype`` to cast its input (DeepSeek-V3.2's indexer, HY-V4's LM head)."""
        stand_in = self.__dict__.get("_weight_stand_in")
        if stand_in is None:
            raise AttributeError(
                f"cpu_linear for {self.module_name!r} was not built from a module: it has no weight to describe"
            )
        return stand_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # an opaque node for dynamo (eager calls skip the op's dispatch)
            return torch_ops.cpu_linear(x, self._handle)
        return self.run(x)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The computation behind ``forward`` (also what the ``ktinject::cpu_linear`` custom op calls).

        At one token this is most of what a projection costs besides the kernel, so the common case (a float32
        CPU tensor) takes no conversions: one output allocation and two array views.
        """
        linear = self._linear
        if linear is None:
            raise OperatorError(f"cpu_linear for {self.module_name!r} has no weights yet (load_weights was not called)")
        if x.shape[-1] != self.in_features:
            raise OperatorError(
                f"cpu_linear for {self.module_name!r}: input has {x.shape[-1]} features, expected {self.in_features}"
            )
        if x.device.type != "cpu" or x.dtype is not torch.float32 or x.requires_grad:
            if x.is_meta:
                raise OperatorError(f"cpu_linear for {self.module_name!r}: the input is on the meta device (no data)")
            return self.run(x.detach().to(device="cpu", dtype=torch.float32)).to(device=x.device, dtype=x.dtype)
        flat = x.reshape(-1, self.in_features)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = torch.empty(flat.shape[0], self.out_features)
        try:
            linear.forward(flat.numpy(), out.numpy())
        except ValueError as exc:
            raise OperatorError(f"cpu_linear for {self.module_name!r}: {exc}") from None
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        where = (
            f", isa={self._linear.isa}, threads={self._linear.threads}, numa_nodes={self._linear.numa_nodes}"
            if self._linear is not None
            else ""
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, "
            f"weights={self._type or 'not loaded'}{where}"
        )


def _linear_weight(module: nn.Module, name: str) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise OperatorError(f"module {name!r} ({type(module).__name__}) is not a linear layer: expected a 2-D 'weight'")
    return weight


def _kernel_type(part) -> str | None:
    """The kernels' name for a stored part's type, or None when they cannot read it as stored."""
    if part is None or len(part.shape) != 2:
        return None
    if part.ggml_type is not None:
        return GGML_TYPE_NAMES.get(part.ggml_type)
    return {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}.get(part.data.dtype)


def _as_blocks(data: np.ndarray, rows: int) -> np.ndarray:
    """A stored 2-D tensor's bytes as uint8 [rows, row_bytes] (a view)."""
    data = np.asarray(data)
    if data.dtype != np.uint8:
        data = data.view(np.uint8)
    return data.reshape(rows, -1)


def _stored_rows(source: WeightSource, name: str) -> RawTensor | None:
    """The weight as stored with rows in the HF order (None when the file's layout changes rows' contents)."""
    return source.stored_rows(name)


def _rows(source: WeightSource, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a weight as float32, without materializing the rest when the source can."""
    return source.tensor_rows(name, start, stop, dtype=torch.float32)
