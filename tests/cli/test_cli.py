"""The ktinject command line as a new user would run it."""

import json

import pytest
from full_size_configs import DEEPSEEK_V3, QWEN3_30B_A3B

from ktinject.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_validate_builtin(capsys):
    code, out, _ = run(capsys, "validate", "deepseek_v3", "--set", "gpu=cpu")
    assert code == 0 and "ok: 8 rules" in out and "routed-experts-on-cpu" in out


def test_validate_reports_file_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - match: {name: x}\n    replace: {op: keep, device: gpu}\n")
    code, _, err = run(capsys, "validate", str(bad))
    assert code == 2
    assert (
        err.strip()
        == f"error: {bad}:3: rules[0].replace.device: bad device 'gpu' (expected 'auto', 'cpu', 'cuda', 'cuda:N', 'xpu:N', 'mps' or 'meta')"
    )


@pytest.mark.parametrize(
    "config, experts_row",
    [(DEEPSEEK_V3, "model.layers.{3-60}.mlp.experts"), (QWEN3_30B_A3B, "model.layers.{0-47}.mlp.experts")],
)
def test_plan_full_size_config_on_meta(capsys, tmp_path, config, experts_row):
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out, _ = run(capsys, "plan", "--config", str(tmp_path), "--set", "gpu=cuda:0")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith(experts_row))
    assert "cpu_experts" in row and " cpu " in row
    assert "estimated memory per device: cpu: " in out and "cuda:0: " in out


def test_plan_deepseek_v3_memory_is_its_bf16_size(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V3))
    _, out, _ = run(capsys, "plan", "--config", str(tmp_path / "config.json"))
    line = next(l for l in out.splitlines() if l.startswith("estimated memory per device"))
    # 58 MoE layers x 256 experts x 3 x 7168 x 2048 x 2 bytes = 1.19 TiB of routed experts, plus the dense rest
    assert "cpu: 1.2 TiB" in line


def test_plan_missing_config(capsys, tmp_path):
    code, _, err = run(capsys, "plan", "--config", str(tmp_path / "nope"))
    assert code == 2 and "config not found" in err


def test_bad_set_option(capsys):
    code, _, err = run(capsys, "validate", "llama", "--set", "novalue")
    assert code == 2 and "--set expects KEY=VALUE" in err


def test_doctor(capsys):
    code, out, _ = run(capsys, "doctor")
    assert code == 0
    for label in (
        "isa",
        "kernel path",
        "numa nodes",
        "numa_balancing",
        "built with NUMA",
        "cpu operators default",
        "torch threads",
    ):
        assert label in out


def test_demo(capsys):
    code, out, _ = run(capsys, "demo", "--max-new-tokens", "20")
    assert code == 0
    assert any(s in out for s in ("Qwen3MoeExperts -> CpuExperts", "Qwen3MoeDecoderLayer -> CpuDecoderLayer"))
    assert "OK: same tokens, logits match" in out
    assert "training step 80/80, loss" in out  # progress while it trains (one line per quarter off a terminal)


def test_demo_model_memorizes_its_sentence_in_few_steps():
    """The demo trains on one torch thread for 80 steps (about two seconds on 2 cores), and that is enough."""
    import torch

    from ktinject.demo_model import DEMO_TEXT, demo_model, demo_tokenizer

    threads = torch.get_num_threads()
    seen = []
    tokenizer = demo_tokenizer()
    model = demo_model(
        tokenizer, progress=lambda step, steps, loss: seen.append((step, steps, torch.get_num_threads()))
    )
    assert seen[-1][:2] == (80, 80) and {t for *_, t in seen} == {1} and torch.get_num_threads() == threads
    ids = tokenizer("ktinject runs", return_tensors="pt")
    text = tokenizer.decode(model.generate(**ids, max_new_tokens=30, do_sample=False)[0])
    assert DEMO_TEXT.startswith(text), text
