"""The operator protocol declared on ktinject.Operator and the WeightSource base operators load through."""

import numpy as np
import pytest
import torch
from tiny_models import tiny_model
from torch import nn

import ktinject
from ktinject.operator import Operator, OperatorConfig
from ktinject.weights import ModuleSource, RawTensor, TensorInfo, WeightSource
from ktinject.weights.source import raw_from_torch


def test_keep_is_a_property_of_the_class_not_of_its_spelling():
    """``keep`` by dotted path places the module like ``keep`` by name: nothing is built, its tensors move."""
    rules = """
rules:
  - match: {name: '^lm_head$'}
    replace: {op: ktinject.operators.keep.Keep, device: meta}
  - match: {name: '^$'}
    replace: {op: keep, device: cpu}
"""
    model = tiny_model("llama")
    linear = model.lm_head
    plan = ktinject.optimize(model, rules)
    entry = next(e for e in plan if e.module_name == "lm_head")
    assert entry.is_keep and entry.rule.replace.is_keep
    assert model.lm_head is linear and model.lm_head.weight.is_meta  # placed, not replaced
    assert plan.memory_by_device()["meta"] == linear.weight.numel() * 4


def test_placement_only_operators_are_never_built():
    class Placer(Operator):
        placement_only = True

        @classmethod
        def from_module(cls, module, *, name, device, config):
            raise AssertionError("a placement-only operator is never built")

    import sys
    import types

    sys.modules["_placer_ops"] = types.SimpleNamespace(Placer=Placer)  # a dotted path resolves through import
    try:
        model = tiny_model("llama")
        plan = ktinject.optimize(model, "- match: {name: '^$'}\n  replace: {op: _placer_ops.Placer, device: cpu}\n")
    finally:
        del sys.modules["_placer_ops"]
    assert [e.is_keep for e in plan] == [True]


def test_protocol_defaults():
    assert Operator.wants_raw_weights is False and Operator.placement_only is False
    from ktinject.operators.cpu_experts import CpuExperts
    from ktinject.operators.cpu_linear import CpuLinear
    from ktinject.operators.keep import Keep

    assert CpuExperts.wants_raw_weights and CpuLinear.wants_raw_weights and Keep.placement_only
    linear = nn.Linear(8, 4)
    stored = {"weight": TensorInfo("w", (4, 8), "Q8_0", 34)}
    # an operator that dequantizes holds the module's bytes whatever the file stores
    assert Operator.estimate_stored_bytes(linear, OperatorConfig(), torch.device("cpu"), stored) == 4 * 8 * 4 + 4 * 4


class _ListSource(WeightSource):
    """Only what every source must answer: names, parts, tensor."""

    def __init__(self, tensors):
        self.tensors = tensors

    def names(self):
        return list(self.tensors)

    def parts(self, name):
        return [raw_from_torch(name, self.tensors[name])]

    def tensor(self, name, dtype=None, device=None):
        return self.tensors[name].to(dtype=dtype, device=device)


def test_weight_source_defaults_serve_the_optional_methods():
    t = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    source = _ListSource({"w": t})
    assert torch.equal(source.tensor_rows("w", 1, 3), t[1:3])
    assert source.tensor_rows("w", 0, 2, dtype=torch.float16).dtype == torch.float16
    stored = source.stored_rows("w")
    assert isinstance(stored, RawTensor) and np.array_equal(stored.data, t.numpy())
    assert source.release() is None


def test_a_source_must_answer_names_parts_and_tensor():
    class Incomplete(WeightSource):
        def names(self):
            return []

    with pytest.raises(TypeError, match="abstract method"):
        Incomplete()


def test_module_source_float_types_and_bf16_bytes():
    module = nn.Linear(4, 2).to(torch.bfloat16)
    (part,) = ModuleSource(module).parts("weight")
    import gguf

    assert (
        part.ggml_type == gguf.GGMLQuantizationType.BF16 and part.data.dtype == np.uint8 and part.data.shape == (2, 8)
    )
    (f32,) = ModuleSource(nn.Linear(4, 2)).parts("weight")
    assert f32.ggml_type is None and f32.type_id == gguf.GGMLQuantizationType.F32
