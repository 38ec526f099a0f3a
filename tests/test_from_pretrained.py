"""ktinject.from_pretrained: meta build, rules, streamed GGUF/safetensors weights, stock generate().

Reference models: for GGUF, the plain HF model with gguf-py's dequantization of the written file put back
into its tensors by the writer's own inverse (tests/gguf_writer.py); for safetensors, the saved model itself.
"""

from __future__ import annotations

import copy
import mmap

import gguf
import numpy as np
import pytest
import torch
from gguf_writer import KQUANT_SIZES, kquant_types, reference_model, torch_rules, write_gguf
from tiny_models import FAMILIES, tiny_model
from torch import nn

import ktinject
from ktinject.operator import Operator, OperatorConfig
from ktinject.weights.assembled import FileSource

CPU = {"gpu": "cpu"}
# The torch reference operators (exact in float32); the shipped rules are tested in test_builtin_rules_*.
LOAD = dict(rules=torch_rules(), dtype=torch.float32, progress=False, attn_implementation="eager")
GGUF_FAMILIES = ("qwen3_moe", "qwen2_moe", "deepseek_v3", "mixtral")
IDS = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(1))


def family_overrides(family: str) -> dict:
    return {"mlp_only_layers": []} if family == "qwen3_moe" else {}  # llama.cpp's qwen3moe has no dense layers


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def assert_same_model(loaded: nn.Module, reference: nn.Module, atol: float) -> None:
    torch.testing.assert_close(logits(loaded), logits(reference), rtol=0, atol=atol)
    ids = torch.tensor([[5, 17, 33, 2, 71]])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(ids, **kwargs), reference.generate(ids, **kwargs))


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_gguf_gives_the_original_model(family, tmp_path):
    model = tiny_model(family, **family_overrides(family))
    path = write_gguf(model, tmp_path / "m.gguf", types=lambda name, shape: "f32")[0]
    loaded = ktinject.from_pretrained(gguf=path, **LOAD)  # config from the GGUF metadata alone
    assert loaded.config.model_type == family
    assert_same_model(loaded, model, atol=2e-5)


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_q8_0_experts_and_f16_matrices_match_gguf_py_dequantization(family, tmp_path):
    model = tiny_model(family, **family_overrides(family))
    files = write_gguf(model, tmp_path / "m.gguf")  # Q8_0 experts, F16 matrices, F32 vectors
    loaded = ktinject.from_pretrained(gguf=files[0], **LOAD)
    assert_same_model(loaded, reference_model(model, files), atol=2e-5)


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_k_quant_experts_match_gguf_py_dequantization(family, tmp_path):
    model = tiny_model(family, **KQUANT_SIZES[family])
    files = write_gguf(model, tmp_path / "m.gguf", types=kquant_types)  # Q4_K gate/up, Q6_K down, Q8_0 attention
    model.save_pretrained(tmp_path)  # the directory gives the config; the weights still come from the GGUF
    loaded = ktinject.from_pretrained(tmp_path, gguf="m.gguf", **LOAD)
    assert_same_model(loaded, reference_model(model, files), atol=1e-4)


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_safetensors_checkpoint_gives_the_original_model(family, tmp_path):
    model = tiny_model(family, **family_overrides(family))
    model.save_pretrained(tmp_path, max_shard_size="50KB" if family == "deepseek_v3" else "5GB")
    loaded = ktinject.from_pretrained(tmp_path, **LOAD)
    assert_same_model(loaded, model, atol=2e-5)
    assert loaded.generation_config.pad_token_id == model.generation_config.pad_token_id  # generation_config.json read


def test_loaded_model_is_placed_by_the_rules_and_frozen(tmp_path):
    model = tiny_model("qwen3_moe", **family_overrides("qwen3_moe"))
    path = write_gguf(model, tmp_path / "m.gguf")[0]
    loaded = ktinject.from_pretrained(gguf=path, **LOAD)
    assert type(loaded.model.layers[0].mlp.experts).__name__ == "TorchExperts"
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "TorchLinear"
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(ktinject.KtInjectError, match="already optimized"):
        ktinject.optimize(loaded, torch_rules())


def test_split_gguf_loads_from_any_of_its_files(tmp_path):
    model = tiny_model("deepseek_v3")
    files = write_gguf(model, tmp_path / "ds.gguf", split_max_tensors=12)
    assert len(files) > 3
    reference = reference_model(model, files)
    assert_same_model(ktinject.from_pretrained(gguf=files[2], **LOAD), reference, atol=2e-5)


@pytest.mark.parametrize("fmt", ["gguf", "safetensors"])
def test_tied_embeddings_stay_tied(fmt, tmp_path):
    model = tiny_model("qwen3_moe", tie_word_embeddings=True, **family_overrides("qwen3_moe"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    if fmt == "gguf":
        files = write_gguf(model, tmp_path / "m.gguf")
        assert "output.weight" not in {t.name for t in gguf.GGUFReader(files[0]).tensors}
        loaded, reference = ktinject.from_pretrained(gguf=files[0], **LOAD), reference_model(model, files)
    else:
        model.save_pretrained(tmp_path)
        loaded, reference = ktinject.from_pretrained(tmp_path, **LOAD), model
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_same_model(loaded, reference, atol=2e-5)


def test_non_persistent_buffers_are_computed_not_loaded(tmp_path):
    model = tiny_model("gpt_oss")  # yarn rope: inv_freq and attention_scaling depend on the config
    path = write_gguf(model, tmp_path / "m.gguf", types=lambda name, shape: "f32")[0]
    loaded = ktinject.from_pretrained(gguf=path, **LOAD)
    rope, expected = loaded.model.rotary_emb, model.model.rotary_emb
    assert not rope.inv_freq.is_meta and torch.equal(rope.inv_freq, expected.inv_freq)
    assert rope.attention_scaling == expected.attention_scaling
    assert "rotary_emb.inv_freq" not in " ".join(loaded.state_dict())  # not a checkpoint tensor


def test_device_map_places_what_no_rule_claims(tmp_path):
    model = tiny_model("qwen3_moe", **family_overrides("qwen3_moe"))
    path = write_gguf(model, tmp_path / "m.gguf", types=lambda name, shape: "f32")[0]
    rules = """
rules:
  - match: {name: '\\.mlp\\.experts$'}
    replace: {op: torch_experts, device: cpu}
"""
    load = {**LOAD, "rules": rules}
    loaded = ktinject.from_pretrained(gguf=path, device_map={"": "cpu", "lm_head": "cpu"}, **load)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert_same_model(loaded, model, atol=2e-5)
    with pytest.raises(ktinject.KtInjectError, match="device_map='auto' is not supported: placement is the rules' job"):
        ktinject.from_pretrained(gguf=path, device_map="auto", **load)


def test_progress_bar_counts_bytes(tmp_path, capsys):
    path = write_gguf(tiny_model("llama"), tmp_path / "m.gguf")[0]
    ktinject.from_pretrained(gguf=path, **{**LOAD, "progress": True})
    err = capsys.readouterr().err
    assert "loading weights" in err and "100%" in err


class RawExperts(Operator):
    """Stand-in for cpu_experts: takes the stored blocks (parts) and dequantizes only when it computes."""

    wants_raw_weights = True
    Config = OperatorConfig

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        from ktinject.operators.experts_layout import experts_spec

        self.spec = experts_spec(module)
        self.parts: dict[str, list] = {}

    @classmethod
    def from_module(cls, module, *, name, device, config):
        return cls(module)

    def weight_names(self) -> list[str]:
        return ["gate_up_proj", "down_proj"]

    def load_weights(self, source, prefix: str) -> None:
        self.parts = {w: source.parts(prefix + w) for w in self.weight_names()}

    def _dequantized(self, name: str) -> torch.Tensor:
        arrays = [
            gguf.quants.dequantize(p.data, gguf.GGMLQuantizationType(p.type_id)).reshape(p.shape)
            for p in self.parts[name]
        ]
        return torch.from_numpy(np.concatenate(arrays, axis=1).astype(np.float32))

    def forward(self, hidden, top_k_index, top_k_weights):
        from ktinject.operators.experts_layout import apply_activation

        gate_up, down = self._dequantized("gate_up_proj"), self._dequantized("down_proj")
        inter = self.spec.intermediate_size
        out = torch.zeros_like(hidden)
        for t in range(hidden.shape[0]):
            for slot in range(top_k_index.shape[1]):
                e = int(top_k_index[t, slot])
                h = hidden[t]
                act = apply_activation(gate_up[e, :inter] @ h, gate_up[e, inter:] @ h, self.spec)
                out[t] += top_k_weights[t, slot] * (down[e] @ act)
        return out


def test_raw_weights_operator_gets_blocks_as_stored(tmp_path, monkeypatch):
    model = tiny_model("qwen3_moe", **KQUANT_SIZES["qwen3_moe"])
    files = write_gguf(model, tmp_path / "m.gguf", types=kquant_types)
    dequantized: list[str] = []
    real_tensor = FileSource.tensor
    monkeypatch.setattr(
        FileSource, "tensor", lambda self, name, *a, **k: dequantized.append(name) or real_tensor(self, name, *a, **k)
    )
    loaded = ktinject.from_pretrained(gguf=files[0], **{**LOAD, "rules": torch_rules(f"{__name__}.RawExperts")})
    assert dequantized and not any("experts" in name for name in dequantized)  # never dequantized by the loader
    experts = loaded.model.layers[1].mlp.experts
    gate, up = experts.parts["gate_up_proj"]
    assert (gate.stored_name, up.stored_name) == ("blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight")
    assert (
        gate.ggml_type == gguf.GGMLQuantizationType.Q4_K and gate.shape == (4, 256, 256) and gate.data.dtype == np.uint8
    )
    base = gate.data
    while isinstance(base, np.ndarray) and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, (np.memmap, mmap.mmap))  # a view of the mapped file
    (down,) = experts.parts["down_proj"]
    assert down.ggml_type == gguf.GGMLQuantizationType.Q6_K
    torch.testing.assert_close(logits(loaded), logits(reference_model(model, files)), rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen3_moe", "llama"])
def test_builtin_rules_load_a_gguf(family, tmp_path):
    """rules="auto": the shipped family file, whatever operator it gives the experts (raw blocks or not)."""
    model = tiny_model(family, **(KQUANT_SIZES.get(family) or {}))
    files = write_gguf(model, tmp_path / "m.gguf", types=kquant_types)
    loaded = ktinject.from_pretrained(gguf=files[0], vars=CPU, dtype=torch.float32, progress=False)
    plan = getattr(loaded, "_ktinject_plan")
    assert any(str(f).endswith(f"{family}.yaml") for f in plan.rules.files)
    reference = logits(reference_model(model, files))
    actual = logits(loaded)
    assert torch.isfinite(actual).all()
    # cpu_experts and cpu_linear quantize activations to int8 (measured 5.7e-2 here through 3 random layers, 3.9e-2
    # with the projections in float); a wiring error (gate/up swapped, wrong expert order, wrong block type) is O(1).
    assert (actual - reference).norm() / reference.norm() < 0.08
    for module in loaded.modules():
        if type(module).__name__ == "CpuExperts":  # K-quant blocks arrived as stored, not requantized
            assert module._types == ("q4_k", "q4_k", "q6_k")
        if (
            type(module).__name__ == "CpuLinear"
        ):  # as stored: Q8_0 projections (F16 where rows do not fit 32-blocks), F16 LM head
            stored_f16 = module.module_name == "lm_head" or module.in_features % 32
            assert module._type == ("f16" if stored_f16 else "q8_0"), module.module_name


@pytest.mark.gpu
def test_gpu_placement_dequantizes_onto_the_device(tmp_path):
    model = tiny_model("deepseek_v3", **KQUANT_SIZES["deepseek_v3"])
    files = write_gguf(model, tmp_path / "m.gguf", types=kquant_types)
    loaded = ktinject.from_pretrained(gguf=files[0], **{**LOAD, "rules": torch_rules(device="cuda:0")})
    assert loaded.model.layers[1].self_attn.kv_b_proj.weight.device.type == "cuda"
    assert (
        loaded.model.embed_tokens.weight.device.type == "cuda"
        and loaded.model.rotary_emb.inv_freq.device.type == "cuda"
    )
    assert loaded.model.layers[1].mlp.experts.gate.device.type == "cpu"
    reference = reference_model(model, files)
    torch.testing.assert_close(logits(loaded).cpu(), logits(reference), rtol=0, atol=1e-3)
    ids = torch.tensor([[5, 17, 33, 2, 71]])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(ids.cuda(), **kwargs).cpu(), reference.generate(ids, **kwargs))


@pytest.mark.parametrize("family, dtype", [("deepseek_v3", torch.bfloat16), ("gpt_oss", torch.float16)])
def test_dtypes_match_transformers_from_pretrained(family, dtype, tmp_path):
    """Tensors transformers keeps in float32 (DeepSeek's router, GPT-OSS's norms in fp16) stay float32."""
    from transformers import AutoModelForCausalLM

    tiny_model(family).save_pretrained(tmp_path)
    expected = {k: v.dtype for k, v in AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).state_dict().items()}
    keep_all = "rules:\n  - {match: {name: '^$'}, replace: {op: keep, device: cpu}}\n"
    loaded = ktinject.from_pretrained(tmp_path, rules=keep_all, dtype=dtype, progress=False)
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == expected
    assert torch.float32 in expected.values() and dtype in expected.values()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_bf16_checkpoint_streams_experts_into_cpu_experts(family, tmp_path, monkeypatch):
    """A bf16 safetensors checkpoint (the usual HF format) goes to cpu_experts a few experts at a time, kept bf16.

    Its per-expert tensors carry a GGML type (BF16) but are not GGUF stacks: they take the float path, which
    asks the source for batches of experts (tensor_rows) and never for a layer's whole experts tensor.
    """
    model = tiny_model(family)
    with torch.no_grad():  # bf16-exact weights; the float32 model stays the reference (its rope buffers too)
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path)
    whole = []
    original = FileSource.tensor
    monkeypatch.setattr(
        FileSource, "tensor", lambda self, name, *a, **k: whole.append(name) or original(self, name, *a, **k)
    )
    loaded = ktinject.from_pretrained(tmp_path, **{**LOAD, "rules": torch_rules("cpu_experts")})
    assert not [n for n in whole if ".mlp.experts." in n and not n.endswith("_bias")]
    experts = loaded.model.layers[0].mlp.experts
    assert type(experts).__name__ == "CpuExperts" and "bf16" in repr(experts)
    # The same bf16 weights in float32 everywhere: cpu_experts computes bf16 weights exactly in f32.
    assert_same_model(loaded, model, atol=2e-5)
