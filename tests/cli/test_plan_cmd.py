"""``ktinject plan`` on a GGUF file (config from its metadata, memory at the stored types) and ``--json``."""

import json
import shutil

import gguf
import pytest
from gguf_writer import KQUANT_SIZES, kquant_types, write_gguf
from tiny_models import tiny_model

from ktinject.cli import main
from ktinject.native import native_available

pytestmark = pytest.mark.skipif(not native_available(), reason="K-quant GGUFs are written with the C++ quantizer")


def plan_json(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def kquant_gguf(tmp_path_factory):
    """A tiny Qwen3-MoE as a Q4_K_M-like GGUF (Q4_K gate/up and Q6_K down experts, Q8_0 projections)."""
    tmp = tmp_path_factory.mktemp("plan")
    model = tiny_model("qwen3_moe", **KQUANT_SIZES["qwen3_moe"])
    (path,) = write_gguf(model, tmp / "tiny-Q4_K_M.gguf", types=kquant_types)
    model.config.save_pretrained(tmp / "dir")
    return path, tmp / "dir"


def stored_bytes(path, *names) -> int:
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    return sum(tensors[n] for n in names)


def test_plan_reads_a_gguf_and_counts_blocks_kept_as_stored(capsys, kquant_gguf):
    path, config_dir = kquant_gguf
    from_file = plan_json(capsys, "--config", str(path), "--set", "gpu=cpu")
    assert from_file["model_type"] == "qwen3_moe" and from_file["weights"] == str(path)
    entries = {e["module"]: e for e in from_file["entries"]}
    # Every layer is MoE: a whole cpu_decoder_layer, holding its parts as the file stores them (K-quant experts,
    # Q8_0 projections, float32 router and norms)
    layer = entries["model.layers.1"]
    assert layer["op"] == "decoder_layer" and layer["device"] == "cpu" and layer["rule"] == "decoder-layers"
    experts = stored_bytes(path, *(f"blk.1.ffn_{p}_exps.weight" for p in ("gate", "up", "down")))
    projections = stored_bytes(path, *(f"blk.1.attn_{p}.weight" for p in ("q", "k", "v", "output")))
    small = stored_bytes(
        path, *(f"blk.1.{n}.weight" for n in ("attn_q_norm", "attn_k_norm", "attn_norm", "ffn_norm", "ffn_gate_inp"))
    )
    assert layer["bytes"] == experts + projections + small

    from_config = plan_json(capsys, "--config", str(config_dir), "--set", "gpu=cpu")
    assert from_config["weights"] is None
    at_dtype = {e["module"]: e["bytes"] for e in from_config["entries"]}
    assert at_dtype["model.layers.1"] > 3 * layer["bytes"]  # float32 config vs ~4.5-8.5 bits per weight
    total = sum(e["bytes"] for e in from_file["entries"])
    assert from_file["memory_by_device"] == {"cpu": total}
    # whole layers here: the shipped rules for the parts (and for dense MLPs) claim nothing, as expected
    assert all(r["builtin"] for r in from_file["unmatched_rules"])


def test_plan_of_a_gguf_prints_the_table(capsys, kquant_gguf, tmp_path):
    path, _ = kquant_gguf
    renamed = tmp_path / "model.bin"  # recognised by its magic, not only by its name
    shutil.copy(path, renamed)
    assert main(["plan", "--config", str(renamed), "--set", "gpu=cpu"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.{0-2}" in out and "decoder_layer" in out  # every layer of this tiny model is MoE
    assert f"memory at the types stored in {renamed}" in out


def test_plan_json_of_a_config_lists_unmatched_rules(capsys, kquant_gguf, tmp_path):
    _, config_dir = kquant_gguf
    rules = tmp_path / "r.yaml"
    rules.write_text(
        "include: [qwen3_moe]\nrules:\n  - name: nothing\n    match: {name: '^nope$'}\n"
        "    replace: {op: keep, device: cpu}\n"
    )
    data = plan_json(capsys, "--config", str(config_dir / "config.json"), "--rules", str(rules), "--set", "gpu=cuda:0")
    assert data["unmatched_rules"] == [{"rule": "nothing", "location": f"{rules}:3", "builtin": False}]
    assert set(data["memory_by_device"]) == {"cpu", "cuda:0"}
    assert {"module", "class", "rule", "location", "op", "device", "bytes"} == set(data["entries"][0])


def test_plan_of_a_missing_gguf(capsys, tmp_path):
    assert main(["plan", "--config", str(tmp_path / "none.gguf")]) == 2
    assert "GGUF file not found" in capsys.readouterr().err
