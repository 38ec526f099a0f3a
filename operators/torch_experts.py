"""``torch_experts``: the pure-torch reference for a HF v5 experts module, on any device.

It accepts every layout ``experts_layout`` describes (fused or DBRX's flat storage, transposed, interleaved,
biased, not gated, clamped/softcapped gates, a post-expert norm, identity experts, Llama-4's dense call),
stores the weights in the canonical orientation, and computes what the HF module computes, expert by expert,
matching it to float32 rounding. It is the correctness baseline the C++ operator is tested against, and a
placement tool (experts on a second GPU, on CPU in fp32...) in its own right.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from ktinject.operators.devices import DtypeName, frozen_parameter, resolve_dtype
from ktinject.operators.experts_layout import (
    ALL_FEATURES,
    ExpertsSpec,
    ExpertWeights,
    apply_activation,
    canonical_from_tensors,
    canonical_weights,
    experts_spec,
    validate_routing,
    weight_names,
)
from torch import nn

from ktinject.errors import OperatorError
from ktinject.operator import Operator, OperatorConfig, register_operator


@dataclasses.dataclass(frozen=True)
class TorchExpertsConfig(OperatorConfig):
    dtype: DtypeName = "auto"  # storage/compute dtype; "auto" keeps the module's


@register_operator("torch_experts")
class TorchExperts(Operator):
    Config = TorchExpertsConfig

    def __init__(
        self,
        spec: ExpertsSpec,
        *,
        name: str,
        device: torch.device,
        dtype: torch.dtype,
        post_expert_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.module_name = name
        e, h, i = spec.num_experts, spec.hidden_size, spec.intermediate_size

        def empty(*shape: int) -> nn.Parameter:
            return frozen_parameter(torch.empty(*shape, device=device, dtype=dtype))

        self.gate = empty(e, i, h) if spec.gated else None
        self.up = empty(e, i, h)
        self.down = empty(e, h, i)
        if spec.has_bias:
            self.gate_bias = empty(e, i) if spec.gated else None
            self.up_bias, self.down_bias = empty(e, i), empty(e, h)
        else:
            self.gate_bias = self.up_bias = self.down_bias = None
        # Muse Spark's norm on each expert's output: a copy of the module's own, so its math is HF's.
        self.post_expert_norm = post_expert_norm

    @classmethod
    def from_module(
        cls, module: nn.Module, *, name: str, device: torch.device, config: TorchExpertsConfig
    ) -> "TorchExperts":
        spec = experts_spec(module, name=name, supports=ALL_FEATURES)
        source_dtype = next(iter(module.parameters())).dtype
        dtype = resolve_dtype(config.dtype, source_dtype)
        norm = copy.deepcopy(module.post_expert_norm) if spec.post_expert_norm else None
        op = cls(spec, name=name, device=torch.device("meta"), dtype=dtype, post_expert_norm=norm)
        if any(p.is_meta for p in module.parameters()):
            op.to_empty(device=device)
        else:
            op._set_weights(canonical_weights(module, spec), device=device, dtype=dtype)
            if norm is not None:
                norm.to(device=device, dtype=dtype)
        return op

    def _set_weights(self, weights: ExpertWeights, *, device: torch.device, dtype: torch.dtype) -> None:
        for field in dataclasses.fields(weights):
            value = getattr(weights, field.name)
            if value is not None:
                setattr(self, field.name, frozen_parameter(value.to(device=device, dtype=dtype).contiguous()))

    def weight_names(self) -> list[str]:
        names = weight_names(self.spec)
        if self.post_expert_norm is not None:
            names += [f"post_expert_norm.{k}" for k in self.post_expert_norm.state_dict()]
        return names

    def load_weights(self, source, prefix: str) -> None:
        device, dtype, s = self.up.device, self.up.dtype, self.spec
        plain = (
            s.storage == "fused" and s.gated and not (s.transposed or s.has_bias or s.interleaved or s.identity_experts)
        )
        if plain:
            # Gate and up stay views of the fused tensor (each expert's [I, H] block is contiguous): split
            # copies would hold a layer's experts twice while loading, and RAM is what big models lack.
            gate_up = source.tensor(prefix + "gate_up_proj", dtype=dtype, device=device)
            inter = s.intermediate_size
            self.gate, self.up = frozen_parameter(gate_up[:, :inter]), frozen_parameter(gate_up[:, inter:])
            self.down = frozen_parameter(source.tensor(prefix + "down_proj", dtype=dtype, device=device))
        else:
            tensors = {n: source.tensor(prefix + n, dtype=dtype) for n in weight_names(s)}
            self._set_weights(canonical_from_tensors(tensors, s), device=device, dtype=dtype)
        if self.post_expert_norm is not None:
            state = {
                k: source.tensor(f"{prefix}post_expert_norm.{k}", dtype=dtype, device=device)
                for k in self.post_expert_norm.state_dict()
            }
            self.post_expert_norm.load_state_dict(state)

    # ---- running ----------------------------------------------------------------------------------

    def _expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One routed expert on rows ``x`` (post-expert norm included, routing weight not)."""

        def bias(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[expert]

        up = nn.functional.linear(x, self.up[expert], bias(self.up_bias))
        gate = None if self.gate is None else nn.functional.linear(x, self.gate[expert], bias(self.gate_bias))
        y = nn.functional.linear(apply_activation(gate, up, self.spec), self.down[expert], bias(self.down_bias))
        return y if self.post_expert_norm is None else self.post_expert_norm(y)

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor | None = None,
        top_k_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.spec.call == "dense":
            if top_k_index is not None or top_k_weights is not None:
                raise OperatorError(
                    f"{self.module_name}: these experts are called as experts(hidden[E*T, H]) (dense), not with routing"
                )
            return self._dense(hidden_states)
        if top_k_index is None or top_k_weights is None:
            raise OperatorError(
                f"{self.module_name}: experts(hidden, top_k_index, top_k_weights) needs all three arguments"
            )
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1]) if self.spec.hidden_3d else hidden_states
        validate_routing(flat, top_k_index, top_k_weights, self.spec, self.module_name)
        device, dtype = self.up.device, self.up.dtype
        x = flat.to(device=device, dtype=dtype)
        index = top_k_index.to(device)
        routing = top_k_weights.to(device)
        # One row per (token, slot), summed at the end in float32: each slot is written once, so there is no
        # scatter-add (slow and nondeterministic on CPU threads and GPUs) and rounding does not depend on
        # how many experts a token hit before.
        slots = x.new_zeros(index.shape[0], index.shape[1], x.shape[1])
        routed, total = self.spec.num_experts, self.spec.num_experts + self.spec.identity_experts
        # Group (token, slot) pairs by expert once; ids >= total (HF's "masked" slot) contribute nothing.
        counts = torch.bincount(index.reshape(-1), minlength=total + 1)
        for expert in torch.nonzero(counts[:total]).flatten().tolist():
            token_idx, slot = torch.where(index == expert)
            xe = x[token_idx]
            y = self._expert(expert, xe) if expert < routed else xe  # identity experts pass their input
            slots[token_idx, slot] = (y * routing[token_idx, slot, None]).to(dtype)
        out = slots.sum(dim=1, dtype=torch.float32)
        if self.spec.hidden_3d:  # DBRX returns [B, -1, H] for hidden [B, S, H]
            out = out.view(shape[0], -1, shape[-1])
        return out.to(device=hidden_states.device, dtype=hidden_states.dtype)

    def _dense(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Llama-4's call: rows ``[e*T, (e+1)*T)`` go through expert ``e`` (already scaled by the router)."""
        e, h = self.spec.num_experts, self.spec.hidden_size
        if hidden_states.dim() != 2 or hidden_states.shape[1] != h or hidden_states.shape[0] % e:
            raise OperatorError(
                f"{self.module_name}: hidden_states must be [num_experts*tokens, {h}] with "
                f"num_experts={e}, got {tuple(hidden_states.shape)}"
            )
        x = hidden_states.to(device=self.up.device, dtype=self.up.dtype).view(e, -1, h)
        out = torch.stack([self._expert(expert, x[expert]) for expert in range(e)])
        return out.view(-1, h).to(device=hidden_states.device, dtype=hidden_states.dtype)

    def extra_repr(self) -> str:
        s = self.spec
        return f"experts={s.num_experts}, hidden={s.hidden_size}, intermediate={s.intermediate_size}, {s.describe()}"
