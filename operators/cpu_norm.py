"""``cpu_rmsnorm`` / ``rmsnorm``: transformers' RMSNorm (the Llama form, shared by ~140 classes) in one C++ call.

At one token transformers' RMSNorm is seven small torch ops (cast, pow, mean, add, rsqrt, mul, mul), each
a dispatch through torch and, after our kernels have streamed their weights, each on cold caches; a decoder
layer has two or three of them. Ours is one call in the calling thread (a row is a few KB: handing it to the
pool would cost more). Under ``torch.compile`` the torch formula is used (the compiler fuses it).
"""

from __future__ import annotations

import numpy as np
import torch
from ktinject.operators.cpu_pool import CpuOperator, CpuOrPlaced
from ktinject.operators.module_forms import computes_like
from torch import nn

from ktinject.errors import OperatorError
from ktinject.native import native
from ktinject.operator import OperatorConfig, register_operator
from ktinject.weights.source import ModuleSource

# The Llama RMSNorm: weight * (x in float32 / sqrt(mean(x^2) + variance_epsilon)).to(x.dtype)
RMSNORM_TEMPLATES = ("transformers.models.llama.modeling_llama:LlamaRMSNorm",)


def unsupported_rmsnorm(module: nn.Module) -> str | None:
    """Why cpu_rmsnorm cannot replace ``module`` (None: it can)."""
    if not computes_like(module, *RMSNORM_TEMPLATES):
        return f"{type(module).__name__} does not compute the Llama RMSNorm (its forward differs)"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return "it has no 1-D weight"
    if not isinstance(getattr(module, "variance_epsilon", None), (int, float)):
        return "it has no variance_epsilon"
    return None


@register_operator("cpu_rmsnorm")
class CpuRmsNorm(CpuOperator):
    """RMSNorm over the last dimension in float32, in our C++ code."""

    Config = OperatorConfig

    def __init__(self, dim: int, eps: float, *, name: str) -> None:
        super().__init__()
        self.dim = dim
        self.variance_epsilon = eps
        self.module_name = name
        self._weight: torch.Tensor | None = None  # float32
        self._weight_array: np.ndarray | None = None
        self._norm = native().rms_norm

    @classmethod
    def from_module(cls, module: nn.Module, *, name: str, device: torch.device, config: OperatorConfig) -> "CpuRmsNorm":
        cls.check_device(device, config)
        why = unsupported_rmsnorm(module)
        if why is not None:
            raise OperatorError(f"cpu_rmsnorm cannot replace {name!r}: {why}")
        op = cls(module.weight.shape[0], float(module.variance_epsilon), name=name)
        if not module.weight.is_meta:
            op.load_weights(ModuleSource(module, description=f"module {name!r}"), "")
        return op

    @classmethod
    def estimate_bytes(cls, module: nn.Module, config: OperatorConfig) -> int:
        return module.weight.numel() * 4

    def weight_names(self) -> list[str]:
        return ["weight"]

    def load_weights(self, source, prefix: str) -> None:
        weight = source.tensor(prefix + "weight", dtype=torch.float32).contiguous()
        if weight.shape != (self.dim,):
            raise OperatorError(
                f"cpu_rmsnorm for {self.module_name!r}: weight has shape {list(weight.shape)}, expected [{self.dim}]"
            )
        self._weight = weight
        self._weight_array = weight.numpy()

    @property
    def weight(self) -> torch.Tensor:
        """The float32 weight (transformers code may read a norm's weight or its dtype)."""
        if self._weight is None:
            raise AttributeError(f"cpu_rmsnorm for {self.module_name!r} has no weight yet")
        return self._weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._weight_array is None:
            raise OperatorError(
                f"cpu_rmsnorm for {self.module_name!r} has no weights yet (load_weights was not called)"
            )
        if x.shape[-1] != self.dim:
            raise OperatorError(
                f"cpu_rmsnorm for {self.module_name!r}: input has {x.shape[-1]} features, expected {self.dim}"
            )
        dtype = x.dtype
        if torch.compiler.is_compiling():
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (h * self._weight.to(h.device)).to(dtype)
        if x.is_meta:
            raise OperatorError(f"cpu_rmsnorm for {self.module_name!r}: the input is on the meta device (no data)")
        flat = x.detach().to(device="cpu", dtype=torch.float32).reshape(-1, self.dim)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = torch.empty(flat.shape)
        self._norm(flat.numpy(), self._weight_array, self.variance_epsilon, out.numpy())
        out = out.view(x.shape)
        return out if dtype is torch.float32 and x.device.type == "cpu" else out.to(device=x.device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.variance_epsilon}"


@register_operator("rmsnorm")
class RmsNorm(CpuOrPlaced):
    """``cpu_rmsnorm`` on the CPU; transformers' RMSNorm, placed, on any other device."""

    Config = OperatorConfig
    cpu_operator = CpuRmsNorm
