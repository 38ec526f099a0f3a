"""from_pretrained fails early and clearly: every missing or mis-shaped tensor listed with the rule that needed
it before any weight is read; damaged files and operators that leave tensors on meta are named."""

from __future__ import annotations

import pytest
import torch
from gguf_writer import torch_rules, write_gguf
from ktinject.operators.torch_experts import TorchExperts
from tiny_models import tiny_model

import ktinject
from ktinject import KtInjectError, WeightError
from ktinject.operator import OperatorConfig
from ktinject.weights.stored import GGUFStoredTensor, TorchStoredTensor

LOAD = dict(rules=torch_rules(), dtype=torch.float32, progress=False)
QWEN = dict(mlp_only_layers=[])


@pytest.fixture()
def no_reads(monkeypatch):
    """Fail the test if any tensor data is read."""

    def refuse(self, start, stop):
        raise AssertionError(f"read {self.name} although the check failed")

    monkeypatch.setattr(GGUFStoredTensor, "rows", refuse)
    monkeypatch.setattr(TorchStoredTensor, "rows", refuse)


def test_missing_tensors_are_all_listed_with_their_rules(tmp_path, no_reads):
    model = tiny_model("qwen3_moe", **QWEN)
    gone = {"blk.1.ffn_up_exps.weight", "output_norm.weight", "blk.2.attn_q.weight"}
    path = write_gguf(model, tmp_path / "m.gguf", skip=lambda name: name in gone)[0]
    with pytest.raises(WeightError) as info:
        ktinject.from_pretrained(gguf=path, **LOAD)
    message = str(info.value)
    head, *lines = message.splitlines()
    assert head == (
        f"3 of {len(model.state_dict())} tensors the model needs cannot be loaded from {path} "
        "(checked before loading; nothing was read):"
    )
    assert lines == [
        "  model.layers.1.mlp.experts.gate_up_proj: missing blk.1.ffn_up_exps.weight  [needed by rule experts (<string>:3) -> torch_experts]",
        "  model.layers.2.self_attn.q_proj.weight: missing blk.2.attn_q.weight  [needed by rule projections (<string>:6) -> torch_linear]",
        "  model.norm.weight: missing output_norm.weight  [needed by rule rest (<string>:9) -> keep on cpu]",
    ]


def test_shape_mismatch_names_file_tensor_and_both_shapes(tmp_path, no_reads):
    model = tiny_model("qwen3_moe", **QWEN)
    path = write_gguf(model, tmp_path / "m.gguf")[0]
    tiny_model("qwen3_moe", moe_intermediate_size=24, **QWEN).config.save_pretrained(
        tmp_path
    )  # a config that disagrees
    with pytest.raises(WeightError) as info:
        ktinject.from_pretrained(tmp_path, gguf=path, **LOAD)
    message = str(info.value)
    assert message.startswith(f"6 of {len(model.state_dict())} tensors the model needs cannot be loaded from {path}")
    assert (
        "  model.layers.0.mlp.experts.gate_up_proj: shape mismatch: the file gives (8, 32, 32) (from "
        "blk.0.ffn_gate_exps.weight (8, 16, 32), blk.0.ffn_up_exps.weight (8, 16, 32)), the model expects (8, 48, 32)  "
        "[needed by rule experts (<string>:3) -> torch_experts]"
    ) in message
    assert (
        "  model.layers.2.mlp.experts.down_proj: shape mismatch: the file gives (8, 32, 16) (from "
        "blk.2.ffn_down_exps.weight (8, 32, 16)), the model expects (8, 32, 24)"
    ) in message


def test_tensor_without_a_gguf_name_is_explained(tmp_path, no_reads):
    model = tiny_model("qwen3_moe", **QWEN)
    path = write_gguf(model, tmp_path / "m.gguf")[0]
    tiny_model("qwen3_moe", mlp_only_layers=[1]).config.save_pretrained(
        tmp_path
    )  # a dense layer llama.cpp cannot store
    with pytest.raises(
        WeightError,
        match=r"model\.layers\.1\.mlp\.gate_proj\.weight: gguf-py's name map for architecture "
        r"'qwen3moe' has no GGUF name for it  \[needed by rule projections \(<string>:6\) -> torch_linear\]",
    ):
        ktinject.from_pretrained(tmp_path, gguf=path, **LOAD)


def test_untied_config_with_tied_file_gets_a_hint(tmp_path):
    model = tiny_model("llama")
    path = write_gguf(model, tmp_path / "m.gguf", skip=lambda name: name == "output.weight")[0]
    model.config.save_pretrained(tmp_path)
    with pytest.raises(
        WeightError,
        match=r"lm_head\.weight: missing output\.weight \(the file has only token_embd\.weight: "
        r"tied embeddings\? the config says tie_word_embeddings=False\)",
    ):
        ktinject.from_pretrained(tmp_path, gguf=path, **LOAD)


def test_safetensors_missing_expert_is_listed(tmp_path, no_reads):
    from safetensors.torch import load_file, save_file

    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.0.block_sparse_moe.experts.2.w2.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        WeightError,
        match=r"1 of \d+ tensors .* from \S+model\.safetensors .*\n  model\.layers\.0\.mlp\.experts\.down_proj: "
        r"missing per-expert tensors model\.layers\.0\.mlp\.experts\.2\.w2\.weight  \[needed by rule experts ",
    ):
        ktinject.from_pretrained(tmp_path, **LOAD)


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_gguf_is_an_error_not_a_crash(tmp_path, keep):
    path = write_gguf(tiny_model("qwen2_moe"), tmp_path / "m.gguf")[0]
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    with pytest.raises(WeightError, match=rf"{path}: .*the file is truncated"):
        ktinject.from_pretrained(gguf=path, **LOAD)


def test_missing_split_is_an_error(tmp_path):
    files = write_gguf(tiny_model("qwen2_moe"), tmp_path / "m.gguf", split_max_tensors=10)
    files[-1].unlink()
    with pytest.raises(WeightError, match=rf"split GGUF of {len(files)} files, but {files[-1].name} is missing"):
        ktinject.from_pretrained(gguf=files[0], **LOAD)


class ForgetfulExperts(TorchExperts):
    """An operator whose load_weights forgets its down projection."""

    Config = OperatorConfig

    @classmethod
    def from_module(cls, module, *, name, device, config):
        op = super().from_module(module, name=name, device=torch.device("meta"), config=TorchExperts.Config())
        return op

    def load_weights(self, source, prefix: str) -> None:
        gate_up = source.tensor(prefix + "gate_up_proj", dtype=torch.float32)
        self.gate = torch.nn.Parameter(gate_up[:, : self.spec.intermediate_size], requires_grad=False)
        self.up = torch.nn.Parameter(gate_up[:, self.spec.intermediate_size :], requires_grad=False)


def test_tensors_left_on_meta_name_the_module_and_operator(tmp_path):
    path = write_gguf(tiny_model("qwen3_moe", **QWEN), tmp_path / "m.gguf")[0]
    with pytest.raises(WeightError) as info:
        ktinject.from_pretrained(gguf=path, **{**LOAD, "rules": torch_rules(f"{__name__}.ForgetfulExperts")})
    lines = str(info.value).splitlines()
    assert lines[0] == "after loading, 3 tensors are still on the meta device (no data):"
    assert lines[1].startswith(
        "  model.layers.0.mlp.experts.down (module model.layers.0.mlp.experts) in ForgetfulExperts "
        "from rule experts (<string>:3) "
    )
    assert lines[1].endswith(f"-> {__name__}.ForgetfulExperts: its load_weights() did not set it")


def test_inputs_are_local_paths_only(tmp_path):
    with pytest.raises(
        KtInjectError,
        match="Qwen/Qwen3-30B-A3B: no such directory or file \\(ktinject loads local files only, never a hub id\\)",
    ):
        ktinject.from_pretrained("Qwen/Qwen3-30B-A3B")
    with pytest.raises(KtInjectError, match="nothing to load weights from"):
        ktinject.from_pretrained()
    with pytest.raises(WeightError, match="GGUF file not found: .*absent.gguf"):
        ktinject.from_pretrained(tmp_path, gguf="absent.gguf")
    with pytest.raises(WeightError, match="has no \\*\\.safetensors files"):
        ktinject.from_pretrained(tmp_path)


def test_damaged_tensor_index_is_an_error_not_garbage(tmp_path):
    """The offset of one tensor moved by a whole alignment step: llama.cpp's running-offset rule catches it."""
    from gguf_bytes import set_tensor_field, tensor_field

    path = write_gguf(tiny_model("qwen3_moe", **QWEN), tmp_path / "m.gguf")[0]
    offset = tensor_field(path, "blk.1.attn_k.weight", "offset")
    set_tensor_field(path, "blk.1.attn_k.weight", "offset", offset + 32)
    with pytest.raises(
        WeightError,
        match=rf"^{path}: tensor blk\.1\.attn_k\.weight \(F16, shape \[32, 16\]\): data offset "
        rf"{offset + 32} leaves a gap; after blk\.1\.attn_q\.weight",
    ):
        ktinject.from_pretrained(gguf=path, **LOAD)


def test_block_count_lower_than_the_file_is_an_error(tmp_path):
    from gguf_bytes import set_metadata

    path = write_gguf(tiny_model("qwen3_moe", **QWEN), tmp_path / "m.gguf")[0]
    set_metadata(path, "qwen3moe.block_count", 1)
    with pytest.raises(
        WeightError,
        match=rf"^{path}: GGUF metadata key qwen3moe\.block_count is 1, but the file has tensors of "
        r"block 2 \(blk\.2\.attn_q\.weight\); blocks are numbered 0 to 0",
    ):
        ktinject.from_pretrained(gguf=path, **LOAD)


def test_safetensors_index_cannot_reach_outside_the_directory(tmp_path):
    import json

    checkpoint = tmp_path / "model"
    tiny_model("llama").save_pretrained(checkpoint)
    (checkpoint / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "../../x.safetensors"}})
    )
    with pytest.raises(
        WeightError,
        match=r"model\.safetensors\.index\.json: shard '\.\./\.\./x\.safetensors' is not a file name inside",
    ):
        ktinject.from_pretrained(checkpoint, **LOAD)
