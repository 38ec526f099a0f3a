"""``marlin_linear``: an ``nn.Linear`` replacement holding a 4-bit weight in Marlin's layout.

The weight is quantized (symmetric, zero point 8, ``group_size`` inputs per fp16/bf16 scale) and packed once,
when the operator is built from a live module or when its weights are loaded; after that only the packed
tensors exist. They are exposed exactly as Marlin stores them, so a state dict written by other Marlin tools
loads unchanged and vice versa:

    qweight  int32 [K/16, 2N]        (K, N: in/out features padded to 128 / 64, padding is exact zeros)
    scales   [K/group_size, N]       fp16 or bf16 (the compute dtype), Marlin's column permutation
    bias     [out_features]          when the replaced module has one

Weights come from a live module (quantized at injection), or through ``load_weights`` from a checkpoint:
``checkpoint: dense`` reads ``weight`` (a GGUF source dequantizes it once; it is then re-quantized to Marlin),
``gptq`` reads a symmetric, non-act-order GPTQ ``qweight``/``scales`` (``qzeros``/``g_idx`` are checked when
present) and repacks it, ``marlin`` reads ``qweight``/``scales`` already in this layout. The multiply runs on
the backend ``operators/marlin/backends.py`` selects for the device (CPU: the emulated reference).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from ktinject.operators.devices import frozen_parameter, resolve_dtype
from ktinject.operators.marlin.backends import Backend, BackendName, PackedWeight, select_backend
from ktinject.operators.marlin.format import (
    check_gptq_g_idx,
    check_gptq_symmetric,
    marlin_padded_shape,
    pack_marlin,
    pad_for_marlin,
    pad_quantized,
    quantize_int4,
    unpack_gptq,
)
from torch import nn

from ktinject.errors import OperatorError, WeightError
from ktinject.operator import Operator, OperatorConfig, register_operator
from ktinject.weights import ModuleSource, WeightSource


@dataclasses.dataclass(frozen=True)
class MarlinLinearConfig(OperatorConfig):
    group_size: int = 128  # inputs per scale; -1: one scale per output channel
    bits: int = 4  # the Marlin layout is 4-bit only; the key exists so rules say what they mean
    dtype: Literal["auto", "bfloat16", "float16"] = "auto"  # activations and scales; auto: the module's, bf16 for fp32
    backend: BackendName = "auto"  # see operators/marlin/backends.py
    checkpoint: Literal["dense", "gptq", "marlin"] = "dense"  # what load_weights reads

    def __post_init__(self) -> None:
        from ktinject.operator import C_INT_MAX, KwargError, check_int

        if type(self.bits) is not int or self.bits != 4:
            raise KwargError("bits", f"marlin_linear supports bits=4 only, got bits={self.bits!r}")
        check_int("group_size", self.group_size, -1, C_INT_MAX, " (it reaches the kernels as a C int)")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 16):
            raise KwargError(
                "group_size", f"group_size must be -1 (per-channel) or a positive multiple of 16, got {self.group_size}"
            )


@register_operator("marlin_linear")
class MarlinLinear(Operator):
    Config = MarlinLinearConfig

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        config: MarlinLinearConfig,
        dtype: torch.dtype,
        device: torch.device,
        name: str = "",
    ) -> None:
        super().__init__()
        if dtype not in (torch.float16, torch.bfloat16):
            raise OperatorError(f"{name or 'marlin_linear'}: compute dtype must be float16 or bfloat16, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.op_config = config  # not `config`: HF code reads `.config` of modules as the model config
        self.module_name = name
        K, N = marlin_padded_shape(in_features, out_features, config.group_size)
        # One scale row when the group covers the padded K (per-channel layout, as Marlin decides it).
        self.group_size = -1 if config.group_size == -1 or config.group_size >= K else config.group_size
        groups = 1 if self.group_size == -1 else K // self.group_size
        self.register_buffer("qweight", torch.zeros(K // 16, 2 * N, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, N, dtype=dtype, device=device))
        self.bias = frozen_parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._backend: Backend | None = None
        self._pinned = False  # set_backend() chose a backend other than the config's

    # -- building -------------------------------------------------------------------------------------------

    @classmethod
    def from_module(
        cls, module: nn.Module, *, name: str, device: torch.device, config: MarlinLinearConfig
    ) -> "MarlinLinear":
        if not isinstance(module, nn.Linear):
            raise OperatorError(f"marlin_linear replaces nn.Linear, but {name!r} is {type(module).__name__}")
        own = module.weight.dtype if module.weight.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        dtype = resolve_dtype(config.dtype, own)
        op = cls(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            config=config,
            dtype=dtype,
            device=device,
            name=name,
        )
        if not module.weight.is_meta:
            # A live module always holds a dense weight, whatever `checkpoint` says about later loads.
            op._load_dense(ModuleSource(module, description=name or "module"), "")
        return op

    @classmethod
    def estimate_bytes(cls, module: nn.Module, config: MarlinLinearConfig) -> int:
        if not isinstance(module, nn.Linear):
            return super().estimate_bytes(module, config)
        K, N = marlin_padded_shape(module.in_features, module.out_features, config.group_size)
        groups = 1 if config.group_size == -1 or config.group_size >= K else K // config.group_size
        return K * N // 2 + groups * N * 2 + (module.out_features * 2 if module.bias is not None else 0)

    def weight_names(self) -> list[str]:
        names = ["weight"] if self.op_config.checkpoint == "dense" else ["qweight", "scales"]
        return names + (["bias"] if self.bias is not None else [])

    def load_weights(self, source: WeightSource, prefix: str) -> None:
        if self.op_config.checkpoint == "dense":
            self._load_dense(source, prefix)
        elif self.op_config.checkpoint == "gptq":
            self._load_gptq(source, prefix)
        else:
            self._load_marlin(source, prefix)

    @property
    def _work_device(self) -> torch.device:
        # Quantize and pack where the weight will live when that is a GPU (fast); elsewhere on the CPU.
        device = self.qweight.device
        return device if device.type == "cuda" else torch.device("cpu")

    @property
    def _label(self) -> str:
        return self.module_name or "marlin_linear"

    def _where(self, prefix: str, name: str) -> str:
        """The tensor's name for messages: the checkpoint name, or ``module.name`` for a live module."""
        return prefix + name if prefix else f"{self._label}.{name}"

    def _load_dense(self, source: WeightSource, prefix: str) -> None:
        where = self._where(prefix, "weight")
        weight = source.tensor(prefix + "weight", dtype=torch.float32, device=self._work_device)
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise WeightError(
                f"{where}: expected shape {(self.out_features, self.in_features)}, got {tuple(weight.shape)}"
            )
        try:
            padded = pad_for_marlin(weight, self.op_config.group_size)
            codes, scales = quantize_int4(padded, self.group_size, self.scales.dtype)
        except ValueError as exc:
            raise WeightError(f"{where}: {exc}") from None
        self._set_packed(*pack_marlin(codes, scales, self.group_size))
        self._load_bias(source, prefix)

    def _load_gptq(self, source: WeightSource, prefix: str) -> None:
        names = set(source.names())
        device = self._work_device
        qweight = source.tensor(prefix + "qweight", device=device)  # dtype None: as stored (int32)
        scales = source.tensor(prefix + "scales", device=device)
        K0, N0 = self.in_features, self.out_features
        if qweight.dtype != torch.int32 or tuple(qweight.shape) != (K0 // 8, N0) or K0 % 8:
            raise WeightError(
                f"{self._where(prefix, 'qweight')}: expected GPTQ int32 [{K0 // 8}, {N0}] (4-bit), "
                f"got {qweight.dtype} {tuple(qweight.shape)}"
            )
        rows = scales.shape[0] if scales.dim() == 2 else 0
        if rows == 0 or scales.shape[1] != N0 or K0 % rows:
            raise WeightError(
                f"{self._where(prefix, 'scales')}: expected [groups, {N0}] with groups dividing {K0}, "
                f"got {tuple(scales.shape)}"
            )
        ckpt_group = -1 if rows == 1 else K0 // rows
        if ckpt_group != self.op_config.group_size and not (rows == 1 and self.group_size == -1):
            raise WeightError(
                f"{self._where(prefix, 'scales')}: the checkpoint's group size is {ckpt_group} ({rows} groups over "
                f"K={K0}), the rule says group_size={self.op_config.group_size}; set kwargs.group_size to {ckpt_group}"
            )
        try:
            if prefix + "qzeros" in names:
                check_gptq_symmetric(source.tensor(prefix + "qzeros"))
            if prefix + "g_idx" in names:
                check_gptq_g_idx(source.tensor(prefix + "g_idx"), K0, ckpt_group)
        except ValueError as exc:
            raise WeightError(f"{self._where(prefix, 'qweight')}: {exc}") from None
        codes = unpack_gptq(qweight).t()  # [N0, K0]
        K, N = self.padded_shape
        codes, scales = pad_quantized(codes, scales.to(self.scales.dtype), self.group_size, K, N)
        self._set_packed(*pack_marlin(codes, scales, self.group_size))
        self._load_bias(source, prefix)

    def _load_marlin(self, source: WeightSource, prefix: str) -> None:
        qweight = source.tensor(prefix + "qweight")
        scales = source.tensor(prefix + "scales")
        if qweight.dtype != torch.int32 or qweight.shape != self.qweight.shape:
            raise WeightError(
                f"{self._where(prefix, 'qweight')}: expected Marlin int32 {tuple(self.qweight.shape)}, "
                f"got {qweight.dtype} {tuple(qweight.shape)}"
            )
        if scales.shape != self.scales.shape:
            raise WeightError(
                f"{self._where(prefix, 'scales')}: expected {tuple(self.scales.shape)} "
                f"(group_size={self.op_config.group_size}), got {tuple(scales.shape)}"
            )
        self._set_packed(qweight, scales)
        self._load_bias(source, prefix)

    def _load_bias(self, source: WeightSource, prefix: str) -> None:
        if self.bias is not None:
            bias = source.tensor(prefix + "bias", dtype=self.bias.dtype, device=self.bias.device)
            if tuple(bias.shape) != (self.out_features,):
                raise WeightError(
                    f"{self._where(prefix, 'bias')}: expected [{self.out_features}], got {tuple(bias.shape)}"
                )
            self.bias = frozen_parameter(bias.contiguous())

    def _set_packed(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        device = self.qweight.device
        self.qweight = qweight.to(device=device, dtype=torch.int32).contiguous()
        self.scales = scales.to(device=device, dtype=self.scales.dtype).contiguous()
        self._select_backend()

    def _select_backend(self, requested: BackendName | None = None) -> None:
        packed = PackedWeight(self.qweight, self.scales, self.group_size, self.out_features)
        requested = requested or (self._backend.name if self._pinned else self.op_config.backend)
        self._backend = select_backend(requested, packed, module_name=self._label)

    def set_backend(self, name: BackendName) -> None:
        """Run on backend ``name`` from now on (same packed weights); OperatorError if it cannot run here.

        For comparing backends (tests, benchmarks); rules choose with the ``backend`` kwarg.
        """
        if self._backend is None:
            raise OperatorError(f"{self._label}: no weights yet")
        self._select_backend(name)
        self._pinned = name != "auto"

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._select_backend()  # new tensors: the backend (and any converted copy it holds) must follow

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self._backend is not None:  # moved or cast: the backend must read the new tensors
            if self.scales.dtype not in (torch.float16, torch.bfloat16):
                raise OperatorError(f"{self._label}: scales must stay float16 or bfloat16, got {self.scales.dtype}")
            self._select_backend()
        return self

    # -- running --------------------------------------------------------------------------------------------

    @property
    def padded_shape(self) -> tuple[int, int]:
        """``(K, N)`` of the packed weight: in/out features padded to the layout."""
        return self.qweight.shape[0] * 16, self.scales.shape[1]

    @property
    def backend(self) -> str:
        """The name of the backend computing this operator ("" until it has weights)."""
        return self._backend.name if self._backend is not None else ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._backend is None:
            raise OperatorError(f"{self._label}: no weights yet (build from a live module or call load_weights)")
        if x.shape[-1] != self.in_features:
            raise OperatorError(f"{self._label}: input has {x.shape[-1]} features, expected {self.in_features}")
        K, _ = self.padded_shape
        x2 = x.reshape(-1, self.in_features).to(device=self.qweight.device, dtype=self.scales.dtype)
        if K != self.in_features:
            x2 = F.pad(x2, (0, K - self.in_features))
        y = self._backend(x2.contiguous(), self.bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        dtype = str(self.scales.dtype).removeprefix("torch.")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"group_size={self.group_size}, dtype={dtype}, backend={self.backend or 'none'}"
        )
