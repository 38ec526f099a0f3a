"""Shared pieces of the marlin_linear tests: rule text, a tiny dense Qwen3, twins of a model that isolate
quantization error from kernel error, and the kernel-faithful reference used by every backend test."""

from __future__ import annotations

import copy
import importlib
import os
import sys
from types import ModuleType

import pytest
import torch
from ktinject.operators.marlin.format import dequantize_marlin, pack_marlin, quantize_int4, unpack_marlin
from tiny_models import COMMON, tiny_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ktinject.weights.source import WeightSource, raw_from_torch

PROJECTION = r"\.(self_attn|mlp)\.\w+_proj$"


def linear_rules(device: str = "cpu", **kwargs) -> str:
    """Every attention/MLP projection becomes marlin_linear on ``device`` with ``kwargs``; the rest stays."""
    kw = ", ".join(f"{k}: {v}" for k, v in kwargs.items())
    return f"""
rules:
  - name: projections-int4
    match: {{name: '{PROJECTION}', class: Linear}}
    replace: {{op: marlin_linear, device: '{device}', kwargs: {{{kw}}}}}
  - match: {{name: '^$'}}
    replace: {{op: keep, device: '{device}'}}
"""


def tiny_qwen3(seed: int = 0) -> nn.Module:
    """A dense Qwen3 (q/k norms, GQA) in the style of tiny_models (not a family with built-in rules there)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model("qwen3", **{**COMMON, "num_hidden_layers": 2, "head_dim": 8, "intermediate_size": 48})
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
    model.generation_config.pad_token_id = 0
    return model.eval()


def tiny(family: str) -> nn.Module:
    """``qwen3``, ``llama`` (hidden 32: one scale group per row once K is padded to 128) or ``llama_wide``
    (hidden 128, intermediate 256: several real groups per row at group_size 64)."""
    if family == "qwen3":
        return tiny_qwen3()
    if family == "llama_wide":
        return tiny_model("llama", hidden_size=128, intermediate_size=256, head_dim=32)
    return tiny_model(family)


def marlin_ops(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if type(m).__name__ == "MarlinLinear"}


def operand_twin(plain: nn.Module, optimized: nn.Module) -> nn.Module:
    """``plain`` with every replaced Linear computing exactly what its marlin_linear computes, in plain torch.

    The weight is read back from the operator's packed tensors (so a packing bug cannot hide), grouped weights
    are rounded to the compute dtype like the tensor-core operand, and inputs and outputs are rounded to the
    compute dtype like the operator's. What is left between the twin and the operator is fp32 summation order.
    """
    twin = copy.deepcopy(plain)
    for name, op in marlin_ops(optimized).items():
        linear = twin.get_submodule(name)
        K, N = op.padded_shape
        dtype = op.scales.dtype
        w = dequantize_marlin(op.qweight, op.scales, op.group_size, K, N)[: op.out_features, : op.in_features]
        if op.scales.shape[0] > 1:
            w = w.to(dtype).float()
        with torch.no_grad():
            linear.weight.copy_(w)
            if linear.bias is not None:
                linear.bias.copy_(op.bias.float())
        linear.register_forward_pre_hook(lambda m, args, d=dtype: (args[0].to(d).float(),))
        linear.register_forward_hook(lambda m, args, out, d=dtype: out.to(d).float())
    return twin


def noise_twin(plain: nn.Module, optimized: nn.Module, seed: int) -> nn.Module:
    """``plain`` with each replaced weight perturbed by noise of the statistics of 4-bit rounding error.

    Round-to-nearest leaves an error uniform in [-scale/2, scale/2] per element; this twin adds exactly such
    noise with the operator's own scales. Its logits error is what 4-bit quantization of this model is expected
    to cost, which is the yardstick the whole-model tolerance is set against.
    """
    twin = copy.deepcopy(plain)
    gen = torch.Generator().manual_seed(seed)
    for name, op in marlin_ops(optimized).items():
        linear = twin.get_submodule(name)
        K, N = op.padded_shape
        scales = unpack_marlin(op.qweight.cpu(), op.scales.cpu(), op.group_size, K, N)[1].float()  # [G, N]
        scale = scales.t().repeat_interleave(K // scales.shape[0], dim=1)[: op.out_features, : op.in_features]
        with torch.no_grad():
            linear.weight.add_((torch.rand(linear.weight.shape, generator=gen) - 0.5) * scale)
    return twin


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Frobenius norm of the difference relative to the expected tensor's."""
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def random_packed(K: int, N: int, group_size: int, dtype: torch.dtype, seed: int = 0):
    """A random weight quantized and packed: (qweight, scales, dense float weight [N, K] it came from)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) * 0.05
    codes, scales = quantize_int4(w, group_size, dtype)
    qweight, mscales = pack_marlin(codes, scales, group_size)
    return qweight, mscales, w


@pytest.fixture(scope="session")
def triton_interpreter() -> ModuleType | None:
    """``operators.marlin.triton_kernel`` imported under TRITON_INTERPRET=1 (runs on CPU tensors), or None.

    None when triton is not installed, or when CUDA is available (the GPU tests run the compiled kernel there).
    The interpreter flag is read when the kernel is decorated, so the module is imported afresh with it set.
    """
    if torch.cuda.is_available():
        yield None
        return
    try:
        import triton  # noqa: F401
    except ImportError:
        yield None
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    sys.modules.pop("ktinject.operators.marlin.triton_kernel", None)
    try:
        yield importlib.import_module("ktinject.operators.marlin.triton_kernel")
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def gptq_pack(codes_kn: torch.Tensor) -> torch.Tensor:
    """GPTQ's qweight: int32 [K/8, N], k = 8*row + p at bits 4p (written independently of repack_gptq)."""
    K, N = codes_kn.shape
    acc = torch.zeros(K // 8, N, dtype=torch.int64)
    for p in range(8):
        acc |= codes_kn[p::8].to(torch.int64) << (4 * p)
    return torch.where(acc >= 1 << 31, acc - (1 << 32), acc).to(torch.int32)


class DictSource(WeightSource):
    """A minimal WeightSource over a dict of tensors; ``dequantize`` stands in for a GGUF file's dequantizer."""

    def __init__(self, tensors: dict[str, torch.Tensor], dequantize=None) -> None:
        self._tensors = tensors
        self._dequantize = dequantize or {}

    def names(self):
        return self._tensors.keys()

    def parts(self, name):
        return [raw_from_torch(name, self._tensors[name])]

    def tensor(self, name, dtype=None, device=None):
        t = self._dequantize[name]() if name in self._dequantize else self._tensors[name]
        return t.to(device=device, dtype=dtype)
