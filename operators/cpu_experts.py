"""``cpu_experts``: the routed experts of a MoE layer on the CPU, in our C++ kernels (csrc/moe).

It replaces a transformers v5 experts module (``mlp.experts``) and keeps its call contract
``experts(hidden[T, H], top_k_index[T, K], top_k_weights[T, K]) -> [T, H]``. Weights live in C++ memory as
GGUF blocks (Q4_K, Q5_K, Q6_K, Q8_0) or float rows (BF16, F16, F32), packed once into the kernels' tile
layout and split over NUMA nodes by the intermediate dimension (1x memory). A live module's float weights
are quantized at injection with our own quantizers; GGUF blocks are taken as stored (``load_weights``).

Per call the operator does a constant handful of torch calls (move/convert the three inputs, allocate the
output) and one ``submit`` + ``sync`` into C++, which releases the GIL while it runs. ``submit()`` and
``sync()`` are public so a caller can overlap other work (a GPU's) with the CPU experts.

The kernels run gated or plain experts with any activation ``experts_layout`` recognises; the few layouts
that are about the call rather than the math are mapped onto that one routed call here, in torch:

- identity experts (LongCat-Flash): their ids go to C++ as the unused-slot id ``E``; ``w * x`` is added here.
- Llama-4's dense call ``experts(hidden[E*T, H])``: one routed row per input row, expert ``row // T``, weight 1.
- DBRX: flat ``mlp.w1/v1/w2`` weights are read into the canonical per-expert form; 3-D hidden states are
  flattened and the result given back as ``[B, -1, H]``.
- a post-expert norm (Muse Spark): every (token, slot) pair runs as its own row with weight 1, the module's
  norm (a copy, in float32) runs on each, then the weighted sum.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
from typing import Any

import numpy as np
import torch
from ktinject.operators import torch_ops
from ktinject.operators.cpu_pool import CpuOperator, CpuPoolConfig
from ktinject.operators.cpu_weights import (
    GGML_TYPE_NAMES,
    GGML_TYPES,
    bytes_per_weight,
    float_type_of,
    kept_stored_bytes,
    to_blocks,
)
from ktinject.operators.experts_layout import (
    CALL_LAYOUTS,
    KERNEL_FEATURES,
    ExpertsSpec,
    canonical_from_tensors,
    experts_spec,
    split_gate_up,
    validate_routing,
)
from ktinject.operators.experts_layout import weight_names as experts_weight_names
from torch import nn

from ktinject.core_sharing import share_cores_with_pool
from ktinject.errors import OperatorError
from ktinject.native import native
from ktinject.operator import register_operator

logger = logging.getLogger("ktinject")

# Experts converted per batch when quantizing a live module (bounds the temporary float32 copy).
_EXPERTS_PER_BATCH = 8

# What cpu_experts runs: the kernels' math, and the call layouts mapped onto a routed call here (see above).
SUPPORTED_FEATURES: frozenset[str] = KERNEL_FEATURES | CALL_LAYOUTS


@dataclasses.dataclass(frozen=True)
class CpuExpertsConfig(CpuPoolConfig):
    """weight_type, threads, numa_nodes, isa (see CpuPoolConfig)."""


@register_operator("cpu_experts")
class CpuExperts(CpuOperator):
    """Routed experts on the CPU (C++ kernels, NUMA-pinned thread pool)."""

    Config = CpuExpertsConfig
    wants_raw_weights = True  # the loader hands GGUF blocks over as stored (see load_weights)

    def __init__(
        self,
        spec: ExpertsSpec,
        *,
        name: str,
        config: CpuExpertsConfig,
        transposed: bool,
        post_expert_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.module_name = name
        self.config = config
        self._source_transposed = transposed
        # Muse Spark's norm on every expert's output: a float32 copy of the module's own, run in torch.
        self.post_expert_norm = post_expert_norm
        self._moe: Any = None  # the native MoE, created once the weight types are known
        self._types: tuple[str, str, str] | None = None
        # Per submitting thread (threading.get_ident()): the output of its call in flight, its device and dtype,
        # and how to turn the kernels' output into the module's result.
        self._pending: dict[int, tuple[torch.Tensor, torch.device, torch.dtype, _CallLayout]] = {}
        self._handle = torch_ops.register(self)

    # ---- building ---------------------------------------------------------------------------------

    @classmethod
    def from_module(
        cls, module: nn.Module, *, name: str, device: torch.device, config: CpuExpertsConfig
    ) -> "CpuExperts":
        if device.type != "cpu":
            raise OperatorError(f"cpu_experts computes on the CPU; {name!r} is placed on {device} (use device: cpu)")
        spec = experts_spec(module, name=name, supports=SUPPORTED_FEATURES)
        norm = None
        if spec.post_expert_norm:
            norm = copy.deepcopy(module.post_expert_norm)
            norm = norm.to_empty(device="cpu") if any(t.is_meta for t in norm.state_dict().values()) else norm
            norm = norm.to(device="cpu", dtype=torch.float32).eval()
        op = cls(spec, name=name, config=config, transposed=spec.transposed, post_expert_norm=norm)
        names = experts_weight_names(spec)
        if not module.get_parameter(names[0]).is_meta:
            if spec.storage == "fused":
                first = module.get_parameter(names[0])
                op._load_from_float(
                    first,
                    module.down_proj,
                    getattr(module, f"{names[0]}_bias", None),
                    getattr(module, "down_proj_bias", None),
                )
            else:
                op._load_canonical_batches(lambda n, start, stop: module.get_parameter(n)[start:stop])
        return op

    @classmethod
    def estimate_bytes(cls, module: nn.Module, config: CpuExpertsConfig) -> int:
        # An OperatorError when the rule matched something that is not an experts module, or one we cannot run.
        spec = experts_spec(module, supports=SUPPORTED_FEATURES)
        first = module.get_parameter(experts_weight_names(spec)[0])
        name = config.weight_type if config.weight_type != "auto" else (float_type_of(first.dtype) or "f32")
        matrices = (3 if spec.gated else 2) * spec.num_experts * spec.intermediate_size * spec.hidden_size
        return int(matrices * bytes_per_weight(name))

    @classmethod
    def estimate_stored_bytes(cls, module: nn.Module, config: CpuExpertsConfig, device: torch.device, stored) -> int:
        return kept_stored_bytes(cls.estimate_bytes(module, config), config.weight_type, stored)

    def _create(self, gate_type: str, up_type: str, down_type: str) -> None:
        s, c = self.spec, self.config
        try:
            self._moe = native().MoE(
                s.num_experts,
                s.hidden_size,
                s.intermediate_size,
                gate_type=GGML_TYPES[gate_type],
                up_type=GGML_TYPES[up_type],
                down_type=GGML_TYPES[down_type],
                activation=s.activation,
                gated=s.gated,
                has_bias=s.has_bias,
                alpha=s.swiglu_alpha,
                limit=s.swiglu_limit,
                softcap_gate=s.softcap_gate,
                softcap_up=s.softcap_up,
                threads=c.threads,
                numa_nodes=c.numa_nodes,
                isa=c.isa,
            )
        except ValueError as exc:
            hint = ""
            if "not a multiple" in str(exc):
                hint = (
                    " (K-quants need dimensions that are multiples of 256, q8_0 of 32; bf16/f16/f32 fit any even size)"
                )
            raise OperatorError(f"cpu_experts for {self.module_name!r}: {exc}{hint}") from None
        self._types = (gate_type, up_type, down_type)
        share_cores_with_pool([c for node in self._moe.cpus for c in node])

    def _float_type(self, dtype: torch.dtype) -> str:
        if self.config.weight_type != "auto":
            return self.config.weight_type
        name = float_type_of(dtype)
        if name is None:
            raise OperatorError(f"cpu_experts for {self.module_name!r}: cannot keep dtype {dtype}; set weight_type")
        return name

    def _load_from_float(
        self,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        gate_up_bias: torch.Tensor | None,
        down_bias: torch.Tensor | None,
    ) -> None:
        """Convert float weights (HF fused layout, any device) to the configured type, a few experts at a time.
        ``gate_up`` is ``up_proj`` for experts without a gate."""
        self._load_float_batches(lambda e0, e1: (gate_up[e0:e1], down[e0:e1]))
        with torch.no_grad():
            if gate_up_bias is not None and down_bias is not None:
                self._load_bias(gate_up_bias.detach().cpu(), down_bias.detach().cpu())
            elif self.spec.has_bias and gate_up_bias is not None:
                raise OperatorError(
                    f"cpu_experts for {self.module_name!r}: the module has gate_up_proj_bias but no down_proj_bias"
                )

    def _load_canonical_batches(self, rows) -> None:
        """Weights stored other than fused (DBRX's flat ``mlp.w1/v1/w2``): ``rows(name, start, stop)`` gives rows
        [start, stop) of the tensor ``name`` (``weight_names``); a few experts at a time, through the canonical form."""
        s = self.spec
        per_expert = s.intermediate_size if s.storage == "w1_v1_w2" else 1  # rows of one expert in each tensor
        names = experts_weight_names(s)
        with torch.no_grad():
            for e0 in range(0, s.num_experts, _EXPERTS_PER_BATCH):
                e1 = min(s.num_experts, e0 + _EXPERTS_PER_BATCH)
                part = dataclasses.replace(s, num_experts=e1 - e0, identity_experts=0)
                w = canonical_from_tensors(
                    {n: rows(n, e0 * per_expert, e1 * per_expert).detach().cpu() for n in names}, part
                )
                if e0 == 0:
                    wtype = self._float_type(w.up.dtype)
                    self._create(wtype, wtype, wtype)
                self._moe.load(
                    e0,
                    None if w.gate is None else to_blocks(w.gate, wtype),
                    to_blocks(w.up, wtype),
                    to_blocks(w.down, wtype),
                )

    def _load_float_batches(self, batch) -> None:
        """``batch(e0, e1)`` gives experts [e0, e1) of (gate_up_proj, down_proj) in the HF layout; each batch is
        converted and packed before the next is asked for, so only a few experts' floats exist at a time."""
        with torch.no_grad():
            for e0 in range(0, self.spec.num_experts, _EXPERTS_PER_BATCH):
                e1 = min(self.spec.num_experts, e0 + _EXPERTS_PER_BATCH)
                gate_up, down = batch(e0, e1)
                if e0 == 0:
                    wtype = self._float_type(gate_up.dtype)
                    self._create(wtype, wtype, wtype)
                gate, up = self._gate_and_up(gate_up.detach().cpu())
                d = down.detach().cpu()
                d = d.transpose(1, 2) if self._source_transposed else d
                self._moe.load(
                    e0, None if gate is None else to_blocks(gate, wtype), to_blocks(up, wtype), to_blocks(d, wtype)
                )

    def _gate_and_up(self, stacked: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Canonical gate and up [E, I, H] (or bias [E, I]) from the module's stacked first tensor; no gate when
        the experts are not gated (the tensor is ``up_proj`` itself)."""
        if self.spec.gated:
            return split_gate_up(stacked, self.spec, transposed=self._source_transposed)
        return None, (stacked.transpose(1, 2) if stacked.dim() == 3 and self._source_transposed else stacked)

    def _load_bias(self, first_bias: torch.Tensor, down_bias: torch.Tensor) -> None:
        gate, up = self._gate_and_up(first_bias[: self.spec.num_experts])  # identity experts own no bias
        self._moe.load_bias(None if gate is None else _f32(gate), _f32(up), _f32(down_bias))

    # ---- loading from a weight source (checkpoint / GGUF) -------------------------------------------

    def weight_names(self) -> list[str]:
        names = experts_weight_names(self.spec)
        if self.post_expert_norm is not None:
            names += [f"post_expert_norm.{k}" for k in self.post_expert_norm.state_dict()]
        return names

    def load_weights(self, source, prefix: str) -> None:
        """Take the weights from ``source``: GGUF blocks as stored when it offers them, else float tensors."""
        if self.post_expert_norm is not None:
            state = {
                k: source.tensor(f"{prefix}post_expert_norm.{k}", dtype=torch.float32)
                for k in self.post_expert_norm.state_dict()
            }
            self.post_expert_norm.load_state_dict(state)
        if self.spec.storage != "fused":
            self._load_canonical_batches(lambda n, start, stop: source.tensor_rows(prefix + n, start, stop))
            return
        loaded = False
        first = self.weight_names()[0]  # gate_up_proj, or up_proj for experts without a gate
        gate_up_parts, down_parts = source.parts(prefix + first), source.parts(prefix + "down_proj")
        if _stored_as_blocks(gate_up_parts, down_parts, self.spec.gated):
            try:
                self._load_blocks(gate_up_parts, down_parts, source.release)
                loaded = True
            except _Requantize:
                pass
        if not loaded:  # a few experts at a time: a layer's float experts never exist whole
            rows = source.tensor_rows
            self._load_float_batches(lambda e0, e1: (rows(prefix + first, e0, e1), rows(prefix + "down_proj", e0, e1)))
        if self.spec.has_bias:
            self._load_bias(source.tensor(prefix + f"{first}_bias"), source.tensor(prefix + "down_proj_bias"))

    def _load_blocks(self, gate_up_parts: list, down_parts: list, release=lambda: None) -> None:
        """GGUF experts stored as [gate_exps (E, I, H), up_exps (E, I, H)] (just [up_exps] when not gated) and
        [down_exps (E, H, I)]."""
        s = self.spec
        if len(gate_up_parts) != (2 if s.gated else 1) or len(down_parts) != 1:
            raise OperatorError(
                f"cpu_experts for {self.module_name!r}: expected stacked gate/up/down expert tensors, got "
                f"{[p.stored_name for p in gate_up_parts]} and {[p.stored_name for p in down_parts]}"
            )
        gate, up = gate_up_parts if s.gated else (None, gate_up_parts[0])
        (down,) = down_parts
        present = [p for p in (gate, up, down) if p is not None]
        expected = {p.stored_name: (s.num_experts, s.intermediate_size, s.hidden_size) for p in present}
        expected[down.stored_name] = (s.num_experts, s.hidden_size, s.intermediate_size)
        for part in present:
            if tuple(part.shape) != expected[part.stored_name]:
                raise OperatorError(
                    f"cpu_experts for {self.module_name!r}: {part.stored_name} has shape {tuple(part.shape)}, "
                    f"expected {expected[part.stored_name]}"
                )
        types = []
        for part in present:
            name = GGML_TYPE_NAMES.get(part.ggml_type)
            if name is None:
                raise OperatorError(
                    f"cpu_experts for {self.module_name!r}: {part.stored_name} is stored as GGML type "
                    f"{part.ggml_type}, which the CPU kernels do not read (supported: {', '.join(GGML_TYPES)})"
                )
            types.append(name)
        wanted = self.config.weight_type
        if wanted != "auto" and any(t != wanted for t in types):
            logger.warning(
                "cpu_experts %s: weight_type=%s but the file stores %s; converting (dequantize + quantize, slow, lossy)",
                self.module_name,
                wanted,
                "/".join(types),
            )
            raise _Requantize()
        self._create(*(types if s.gated else [types[0], *types]))  # no gate: its type is the up type
        for e0 in range(0, s.num_experts, _EXPERTS_PER_BATCH):
            e1 = min(s.num_experts, e0 + _EXPERTS_PER_BATCH)
            gate_blocks = None if gate is None else _blocks_view(gate, e0, e1)
            self._moe.load(e0, gate_blocks, _blocks_view(up, e0, e1), _blocks_view(down, e0, e1))
            release()  # drop the file pages just packed from RSS (the packed copy is what stays)

    # ---- running ----------------------------------------------------------------------------------

    def submit(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor | None = None,
        top_k_weights: torch.Tensor | None = None,
    ) -> None:
        """Start the experts on the CPU and return at once; ``sync()`` returns the result.

        Routing may be left out only for experts with Llama-4's dense call (row ``r`` of ``hidden[E*T, H]``
        goes to expert ``r // T``). Thread-safe: every thread may have one call in flight (submitting twice from
        one thread without ``sync`` is an OperatorError); calls from several threads run one after the other
        on the pool.
        """
        if self._moe is None:
            raise OperatorError(
                f"cpu_experts for {self.module_name!r} has no weights yet (load_weights was not called)"
            )
        s = self.spec
        if s.call == "dense" and top_k_index is None and top_k_weights is None:
            top_k_index, top_k_weights = self._dense_routing(hidden_states)
        elif top_k_index is None or top_k_weights is None:
            raise OperatorError(
                f"cpu_experts for {self.module_name!r}: experts(hidden, top_k_index, top_k_weights) needs all "
                "three arguments"
            )
        flat = (
            hidden_states.reshape(-1, hidden_states.shape[-1])
            if s.hidden_3d and hidden_states.dim() == 3
            else hidden_states
        )
        validate_routing(flat, top_k_index, top_k_weights, s, self.module_name)
        _check_call_inputs(flat, top_k_index, top_k_weights, self.module_name)
        x = flat.detach().to(device="cpu", dtype=torch.float32).contiguous()
        ids = top_k_index.detach().to(device="cpu", dtype=torch.int64).contiguous()
        weights = top_k_weights.detach().to(device="cpu", dtype=torch.float32).contiguous()
        layout = _CallLayout(s, self.post_expert_norm, x, ids, weights, hidden_states.shape)
        rows, row_ids, row_weights = layout.native_inputs()
        out = torch.empty_like(rows)
        try:
            self._moe.submit(rows.numpy(), row_ids.numpy(), row_weights.numpy(), out.numpy())
        except ValueError as exc:
            raise OperatorError(f"cpu_experts for {self.module_name!r}: {exc}") from None
        self._pending[threading.get_ident()] = (out, hidden_states.device, hidden_states.dtype, layout)

    def _dense_routing(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Llama-4's dense call as a routed one: row ``r`` of ``hidden[E*T, H]`` goes to expert ``r // T``, weight 1."""
        e, h = self.spec.num_experts, self.spec.hidden_size
        if hidden.dim() != 2 or hidden.shape[1] != h or hidden.shape[0] % e:
            raise OperatorError(
                f"cpu_experts for {self.module_name!r}: hidden_states must be [num_experts*tokens, {h}] with "
                f"num_experts={e}, got {tuple(hidden.shape)}"
            )
        ids = torch.arange(e, dtype=torch.int64).repeat_interleave(hidden.shape[0] // e)[:, None]
        return ids, torch.ones(ids.shape, dtype=torch.float32)

    def sync(self) -> torch.Tensor:
        """Wait for the submitted call; returns its result on the caller's device and dtype.

        Ctrl-C while waiting cancels the call and raises KeyboardInterrupt within ~50 ms; the operator stays
        usable.
        """
        pending = self._pending.pop(threading.get_ident(), None)
        if pending is None:
            raise OperatorError(f"cpu_experts for {self.module_name!r}: sync() without submit() from this thread")
        out, device, dtype, layout = pending
        try:
            self._moe.sync()
        except ValueError as exc:
            raise OperatorError(f"cpu_experts for {self.module_name!r}: {exc}") from None
        return layout.result(out).to(device=device, dtype=dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor | None = None,
        top_k_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.spec.call == "dense":  # Llama-4: experts(hidden[E*T, H]); HF passes no routing
            if top_k_index is not None or top_k_weights is not None:
                raise OperatorError(
                    f"cpu_experts for {self.module_name!r}: these experts are called as "
                    "experts(hidden[E*T, H]) (dense), not with routing"
                )
            top_k_index, top_k_weights = self._dense_routing(hidden_states)
        elif top_k_index is None or top_k_weights is None:
            raise OperatorError(
                f"cpu_experts for {self.module_name!r}: experts(hidden, top_k_index, top_k_weights) needs all "
                "three arguments"
            )
        if torch.compiler.is_compiling():  # an opaque node for dynamo (eager calls skip the op's dispatch)
            return torch_ops.cpu_experts(hidden_states, top_k_index, top_k_weights, self._handle)
        return self.run(hidden_states, top_k_index, top_k_weights)

    def run(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """One call, start to finish (also what the ``ktinject::cpu_experts`` custom op calls).

        The common case (plain routed layout, CPU float32 hidden and weights, int64 ids) goes to the kernels in one
        native call with no conversions: at one token the Python around the call is a large part of its cost.
        """
        s, moe = self.spec, self._moe
        if (
            moe is not None
            and s.call == "routed"
            and not s.identity_experts
            and self.post_expert_norm is None
            and not s.hidden_3d
            and hidden_states.dtype is torch.float32
            and top_k_weights.dtype is torch.float32
            and top_k_index.dtype is torch.int64
            and hidden_states.device.type == "cpu"
            and top_k_index.device.type == "cpu"
            and top_k_weights.device.type == "cpu"
            and not hidden_states.requires_grad
            and hidden_states.is_contiguous()
            and top_k_index.is_contiguous()
            and top_k_weights.is_contiguous()
        ):
            out = torch.empty(hidden_states.shape)
            try:  # the binding checks shapes, contiguity and ids, naming the argument
                moe.run(hidden_states.numpy(), top_k_index.numpy(), top_k_weights.numpy(), out.numpy())
            except ValueError as exc:
                raise OperatorError(f"cpu_experts for {self.module_name!r}: {exc}") from None
            return out
        self.submit(hidden_states, top_k_index, top_k_weights)
        return self.sync()

    def extra_repr(self) -> str:
        s = self.spec
        types = "/".join(self._types) if self._types else "not loaded"
        where = (
            f"isa={self._moe.isa}, threads={self._moe.threads}, numa_nodes={self._moe.numa_nodes}"
            if self._moe is not None
            else ""
        )
        return f"experts={s.num_experts}, hidden={s.hidden_size}, intermediate={s.intermediate_size}, act={s.activation}, weights={types}, {where}"


def _check_call_inputs(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, name: str) -> None:
    """What the shape checks do not catch: tensors without data, and routing ids that are not integers (a float
    or bool index would be truncated into some other expert's id)."""
    for arg, tensor in (("hidden_states", hidden), ("top_k_index", top_k_index), ("top_k_weights", top_k_weights)):
        if tensor.is_meta:
            raise OperatorError(
                f"cpu_experts for {name!r}: {arg} is on the meta device (no data); load the model's "
                "weights before running it"
            )
    if top_k_index.dtype.is_floating_point or top_k_index.dtype.is_complex or top_k_index.dtype == torch.bool:
        raise OperatorError(f"cpu_experts for {name!r}: top_k_index must be an integer tensor, got {top_k_index.dtype}")
    if not (top_k_weights.dtype.is_floating_point):
        raise OperatorError(
            f"cpu_experts for {name!r}: top_k_weights must be a floating-point tensor, got {top_k_weights.dtype}"
        )


class _CallLayout:
    """One call mapped onto the kernels' routed call and back (identity experts, post-expert norm, 3-D hidden
    states); a plain layout passes everything through."""

    def __init__(
        self,
        spec: ExpertsSpec,
        norm: nn.Module | None,
        x: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        shape: torch.Size,
    ) -> None:
        self.spec, self.norm, self.x, self.ids, self.weights, self.shape = spec, norm, x, ids, weights, shape
        e = spec.num_experts
        # Identity experts (ids E .. E+Z-1) reach C++ as the unused slot E; larger ids stay, so C++ refuses them.
        self.identity = (ids >= e) & (ids < e + spec.identity_experts) if spec.identity_experts else None

    def native_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows, ids and weights for the kernels."""
        ids = self.ids
        if self.identity is not None:
            ids = ids.masked_fill(self.identity, self.spec.num_experts)
        if self.norm is None:
            return self.x, ids, self.weights
        # The norm runs on each expert's output before its weight: every (token, slot) pair is its own row.
        tokens, k = ids.shape
        rows = self.x.repeat_interleave(k, dim=0).contiguous()
        return rows, ids.reshape(tokens * k, 1).contiguous(), torch.ones(tokens * k, 1, dtype=torch.float32)

    def result(self, out: torch.Tensor) -> torch.Tensor:
        """The module's result from the kernels' output."""
        if self.norm is not None:
            tokens, k = self.ids.shape
            with torch.no_grad():
                normed = self.norm(out).view(tokens, k, -1)
            routed = (self.ids < self.spec.num_experts)[..., None]  # unused and identity slots have no expert output
            out = (torch.where(routed, normed, 0.0) * self.weights[..., None]).sum(dim=1)
        if self.identity is not None:  # identity experts return their input times the routing weight
            out = out + (self.weights * self.identity).sum(dim=1, keepdim=True) * self.x
        if self.spec.hidden_3d and len(self.shape) == 3:  # DBRX returns [B, -1, H] for hidden [B, S, H]
            out = out.view(self.shape[0], -1, self.shape[-1])
        return out


class _Requantize(Exception):
    """Internal: stored blocks are not the requested type; fall back to the float path (logged)."""


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.to(torch.float32).numpy())


def _stored_as_blocks(gate_up_parts: list, down_parts: list, gated: bool) -> bool:
    """GGUF-style stacked expert tensors (gate_exps, up_exps, or up_exps alone without a gate; down_exps) with a
    GGML type: packed as stored. Per-expert checkpoint tensors (bf16 safetensors also carry a GGML type) take the
    float path."""
    parts = (*gate_up_parts, *down_parts)
    stacked = (
        len(gate_up_parts) == (2 if gated else 1) and len(down_parts) == 1 and all(len(p.shape) == 3 for p in parts)
    )
    return stacked and all(p.ggml_type is not None for p in (*gate_up_parts, *down_parts))


def _blocks_view(part, e0: int, e1: int) -> np.ndarray:
    """Experts [e0, e1) of a stacked GGUF tensor as uint8 [n, rows, row_bytes] (a view of the mmap)."""
    data = np.asarray(part.data)
    if data.dtype != np.uint8:
        data = data.view(np.uint8)
    rows = part.shape[1]
    return np.ascontiguousarray(data.reshape(part.shape[0], rows, -1)[e0:e1])
