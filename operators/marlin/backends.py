"""The ways ``marlin_linear`` can multiply by a Marlin-packed weight, and how one is chosen.

Every backend reads the same packed tensors (``qweight``, ``scales``; see ``format.py``), so switching backend
never changes the weights, only the arithmetic's summation order. On a CUDA device ``auto`` tries, in order:

    cuda        our kernel (csrc/cuda, loaded with ctypes)        fastest; needs the built library and sm_80+
    triton      operators/marlin/triton_kernel.py                  needs triton
    torch_int4  torch's tinygemm after a one-time conversion       group 32/64/128/256, sm_80+
    dequant     dequantize the whole weight per call + F.linear    always works, slow and memory hungry

and logs (once per process and reason, on the ``ktinject`` logger) each step it falls back. On the CPU ``auto``
is ``emulated``: the pure-torch reference GEMM. Any backend can be asked for by name (rule kwarg ``backend``);
one that cannot run there is an OperatorError, never a silent substitute. Triton on the CPU needs
``TRITON_INTERPRET=1`` (the tests use it to check the kernel without a GPU).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from ktinject.operators.marlin.format import dequantize_marlin, marlin_gemm_reference

from ktinject.errors import OperatorError

logger = logging.getLogger("ktinject")

BackendName = Literal["auto", "cuda", "triton", "torch_int4", "dequant", "emulated"]

_logged: set[str] = set()


def log_once(message: str) -> None:
    """Log a fallback at WARNING the first time it happens in this process (every operator would repeat it)."""
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """What every backend reads: the packed tensors and the sizes around them."""

    qweight: torch.Tensor  # int32 [K/16, 2N]
    scales: torch.Tensor  # [groups, N], fp16 or bf16: also the compute dtype
    group_size: int  # -1 when there is one scale row
    out_features: int  # N before padding: the columns a call returns

    @property
    def K(self) -> int:
        return self.qweight.shape[0] * 16

    @property
    def N(self) -> int:
        return self.scales.shape[1]


class Backend:
    """A way to compute ``x [M, K] @ W.T + bias -> [M, out_features]`` (x already in the compute dtype and padded)."""

    name: ClassVar[str]
    description: ClassVar[str]

    @classmethod
    def unavailable(cls, packed: PackedWeight) -> str | None:
        """Why this backend cannot run for ``packed`` on its device, or None when it can."""
        return None

    def __init__(self, packed: PackedWeight) -> None:
        self.packed = packed

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def _cuda_capability_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"needs a CUDA device, the weight is on {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"needs compute capability 8.0 or newer, {torch.cuda.get_device_name(device)} has {major}.{minor}"
    return None


class CudaBackend(Backend):
    name = "cuda"
    description = "own CUDA kernel"

    @classmethod
    def unavailable(cls, packed: PackedWeight) -> str | None:
        reason = _cuda_capability_reason(packed.qweight.device)
        if reason:
            return reason
        from ktinject.operators.marlin import cuda_kernel

        try:
            cuda_kernel.load_library()
        except RuntimeError as exc:
            return str(exc)
        return None

    def __init__(self, packed: PackedWeight) -> None:
        super().__init__(packed)
        from ktinject.operators.marlin import cuda_kernel

        self._lib = cuda_kernel.load_library()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        p = self.packed
        return self._lib.gemm(x.contiguous(), p.qweight, p.scales, bias, p.out_features)


class TritonBackend(Backend):
    name = "triton"
    description = "Triton kernel"

    @classmethod
    def unavailable(cls, packed: PackedWeight) -> str | None:
        try:
            kernel = importlib.import_module("ktinject.operators.marlin.triton_kernel")
        except ImportError as exc:
            return f"triton is not installed ({exc})"
        device = packed.qweight.device
        if device.type == "cpu":
            return (
                None
                if kernel.INTERPRETED
                else "Triton runs on the CPU only under TRITON_INTERPRET=1 (set before import)"
            )
        if kernel.INTERPRETED:
            return "TRITON_INTERPRET=1 is set: the interpreter runs CPU tensors only"
        return _cuda_capability_reason(device)

    def __init__(self, packed: PackedWeight) -> None:
        super().__init__(packed)
        self._kernel = importlib.import_module("ktinject.operators.marlin.triton_kernel")

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        p = self.packed
        return self._kernel.marlin_matmul(x, p.qweight, p.scales, bias, p.out_features)


class TorchInt4Backend(Backend):
    name = "torch_int4"
    description = "torch's int4 kernel"

    @classmethod
    def unavailable(cls, packed: PackedWeight) -> str | None:
        from ktinject.operators.marlin.torch_int4 import SUPPORTED_GROUPS, int4pack_group_size

        device = packed.qweight.device
        if device.type == "cuda":
            reason = _cuda_capability_reason(device)
            if reason:
                return reason
            if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
                return f"torch {torch.__version__} has no aten._weight_int4pack_mm"
        elif device.type != "cpu":
            return f"torch's int4 kernel runs on CUDA and CPU, not {device.type}"
        if int4pack_group_size(packed.K, packed.scales.shape[0]) is None:
            return f"it takes group sizes {SUPPORTED_GROUPS} only (K={packed.K}, {packed.scales.shape[0]} scale groups)"
        return None

    def __init__(self, packed: PackedWeight) -> None:
        super().__init__(packed)
        from ktinject.operators.marlin import torch_int4

        self._int4 = torch_int4
        self._packed, self._scales_and_zeros, self._group = torch_int4.convert_to_int4pack(
            packed.qweight, packed.scales, packed.K, packed.N
        )

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = self._int4.int4pack_matmul(x, self._packed, self._scales_and_zeros, self._group)
        y = y[:, : self.packed.out_features]
        return y + bias if bias is not None else y


class DequantBackend(Backend):
    name = "dequant"
    description = "dequantize + F.linear"

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        p = self.packed
        w = dequantize_marlin(p.qweight, p.scales, p.group_size, p.K, p.N, dtype=x.dtype)
        return F.linear(x, w[: p.out_features], bias)


class EmulatedBackend(Backend):
    name = "emulated"
    description = "emulated reference GEMM"

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        p = self.packed
        y = marlin_gemm_reference(x, p.qweight, p.scales, p.group_size, p.N, bias)
        return y[:, : p.out_features]


BACKENDS: dict[str, type[Backend]] = {
    cls.name: cls for cls in (CudaBackend, TritonBackend, TorchInt4Backend, DequantBackend, EmulatedBackend)
}
GPU_FALLBACK_ORDER = ("cuda", "triton", "torch_int4", "dequant")


def select_backend(requested: BackendName, packed: PackedWeight, *, module_name: str) -> Backend:
    """The backend ``requested`` (OperatorError if it cannot run here), or for ``auto`` the first that can."""
    device = packed.qweight.device
    if requested != "auto":
        cls = BACKENDS[requested]
        reason = cls.unavailable(packed)
        if reason is None:
            try:
                return cls(packed)
            except (RuntimeError, ValueError) as exc:
                reason = f"preparing it failed: {exc}"
        raise OperatorError(f"{module_name}: marlin_linear backend {requested!r} cannot run on {device}: {reason}")
    if device.type == "cpu":
        return EmulatedBackend(packed)
    if device.type != "cuda":
        log_once(f"marlin_linear: no int4 kernel for {device.type} devices; using dequantize + F.linear")
        return DequantBackend(packed)
    return first_available(GPU_FALLBACK_ORDER, packed)


def first_available(names: tuple[str, ...], packed: PackedWeight) -> Backend:
    """The first backend of ``names`` that can run ``packed``, logging (once) each one skipped and why.

    The last name must always be available (``dequant``).
    """
    for i, name in enumerate(names):
        cls = BACKENDS[name]
        reason = cls.unavailable(packed)
        if reason is None:
            try:
                return cls(packed)
            except (RuntimeError, ValueError) as exc:  # e.g. torch's int4 conversion refusing this weight
                reason = f"preparing it failed: {exc}"
        if i + 1 == len(names):
            raise OperatorError(
                f"marlin_linear: no backend can run this weight; the last one ({name}) failed: {reason}"
            )
        fallback = BACKENDS[names[i + 1]].description
        log_once(f"marlin_linear: {cls.description} unavailable ({reason}); falling back to {fallback}")
    raise OperatorError("marlin_linear: no backend to choose from")
