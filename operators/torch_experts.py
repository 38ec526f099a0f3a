"""``torch_experts``: the pure-torch reference for a HF v5 fused experts module, on any device.

It accepts every layout ``experts_layout`` understands (the fused default and GPT-OSS's transposed,
interleaved, biased one), stores the weights in the canonical orientation, and computes exactly what the
HF module computes, expert by expert in ascending order like HF's eager loop, so the results match the
original bit for bit in float32. It is the correctness baseline the C++ operator is tested against, and a
placement tool (experts on a second GPU, on CPU in fp32...) in its own right.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ktinject.operator import Operator, OperatorConfig, register_operator
from ktinject.operators.devices import DtypeName, frozen_parameter, resolve_dtype
from ktinject.operators.experts_layout import (
    ExpertsSpec,
    ExpertWeights,
    apply_activation,
    canonical_weights,
    experts_spec,
    split_gate_up,
    validate_routing,
)


@dataclasses.dataclass(frozen=True)
class TorchExpertsConfig(OperatorConfig):
    dtype: DtypeName = "auto"  # storage/compute dtype; "auto" keeps the module's


@register_operator("torch_experts")
class TorchExperts(Operator):
    Config = TorchExpertsConfig

    def __init__(self, spec: ExpertsSpec, *, name: str, device: torch.device, dtype: torch.dtype, transposed: bool) -> None:
        super().__init__()
        self.spec = spec
        self.module_name = name
        self._source_transposed = transposed  # orientation of the checkpoint tensors we load from
        e, h, i = spec.num_experts, spec.hidden_size, spec.intermediate_size

        def empty(*shape: int) -> nn.Parameter:
            return frozen_parameter(torch.empty(*shape, device=device, dtype=dtype))

        self.gate = empty(e, i, h)
        self.up = empty(e, i, h)
        self.down = empty(e, h, i)
        if spec.has_bias:
            self.gate_bias, self.up_bias, self.down_bias = empty(e, i), empty(e, i), empty(e, h)
        else:
            self.gate_bias = self.up_bias = self.down_bias = None

    @classmethod
    def from_module(cls, module: nn.Module, *, name: str, device: torch.device, config: TorchExpertsConfig) -> "TorchExperts":
        spec = experts_spec(module, name=name)
        dtype = resolve_dtype(config.dtype, module.gate_up_proj.dtype)
        transposed = bool(getattr(module, "is_transposed", False))
        op = cls(spec, name=name, device=torch.device("meta"), dtype=dtype, transposed=transposed)
        if module.gate_up_proj.is_meta:
            op.to_empty(device=device)
        else:
            op._set_weights(canonical_weights(module, spec), device=device, dtype=dtype)
        return op

    def _set_weights(self, weights: ExpertWeights, *, device: torch.device, dtype: torch.dtype) -> None:
        for field in dataclasses.fields(weights):
            value = getattr(weights, field.name)
            if value is not None:
                setattr(self, field.name, frozen_parameter(value.to(device=device, dtype=dtype).contiguous()))

    def weight_names(self) -> list[str]:
        names = ["gate_up_proj", "down_proj"]
        return names + ["gate_up_proj_bias", "down_proj_bias"] if self.spec.has_bias else names

    def load_weights(self, source, prefix: str) -> None:
        device, dtype = self.gate.device, self.gate.dtype
        gate_up = source.tensor(prefix + "gate_up_proj", dtype=dtype, device=device)
        if not (self._source_transposed or self.spec.has_bias or self.spec.activation == "gptoss_swiglu"):
            # Gate and up stay views of the fused tensor (each expert's [I, H] block is contiguous): split
            # copies would hold a layer's experts twice while loading, and RAM is what big models lack.
            inter = self.spec.intermediate_size
            self.gate, self.up = frozen_parameter(gate_up[:, :inter]), frozen_parameter(gate_up[:, inter:])
            self.down = frozen_parameter(source.tensor(prefix + "down_proj", dtype=dtype, device=device))
            return
        gate, up = split_gate_up(gate_up, self.spec, transposed=self._source_transposed)
        del gate_up
        down = source.tensor(prefix + "down_proj", dtype=dtype)
        weights = ExpertWeights(gate=gate, up=up, down=down.transpose(1, 2) if self._source_transposed else down)
        if self.spec.has_bias:
            weights.gate_bias, weights.up_bias = split_gate_up(
                source.tensor(prefix + "gate_up_proj_bias", dtype=dtype), self.spec, transposed=self._source_transposed
            )
            weights.down_bias = source.tensor(prefix + "down_proj_bias", dtype=dtype)
        self._set_weights(weights, device=device, dtype=dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        validate_routing(hidden_states, top_k_index, top_k_weights, self.spec, self.module_name)
        device, dtype = self.gate.device, self.gate.dtype
        x = hidden_states.to(device=device, dtype=dtype)
        index = top_k_index.to(device)
        routing = top_k_weights.to(device)
        out = torch.zeros_like(x)
        num_experts = self.spec.num_experts
        # Group (token, slot) pairs by expert once; id == num_experts is HF's "masked" slot and is skipped.
        counts = torch.bincount(index.reshape(-1), minlength=num_experts + 1)
        for expert in torch.nonzero(counts[:num_experts]).flatten().tolist():
            token_idx, slot = torch.where(index == expert)
            xe = x[token_idx]
            gate = nn.functional.linear(xe, self.gate[expert], None if self.gate_bias is None else self.gate_bias[expert])
            up = nn.functional.linear(xe, self.up[expert], None if self.up_bias is None else self.up_bias[expert])
            y = nn.functional.linear(
                apply_activation(gate, up, self.spec),
                self.down[expert],
                None if self.down_bias is None else self.down_bias[expert],
            )
            out.index_add_(0, token_idx, (y * routing[token_idx, slot, None]).to(dtype))
        return out.to(device=hidden_states.device, dtype=hidden_states.dtype)

    def extra_repr(self) -> str:
        s = self.spec
        return f"experts={s.num_experts}, hidden={s.hidden_size}, intermediate={s.intermediate_size}, act={s.activation}, bias={s.has_bias}"
