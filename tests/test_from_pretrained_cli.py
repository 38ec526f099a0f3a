"""`ktinject generate`: loads with rules from safetensors or GGUF, uses the directory's tokenizer, reports speeds."""

from __future__ import annotations

import re

import pytest
from gguf_writer import torch_rules, write_gguf

from ktinject.cli import main
from ktinject.demo_model import demo_model, demo_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("generate")
    tokenizer = demo_tokenizer()
    model = demo_model(tokenizer, steps=0)  # untrained: the text is noise, the pipeline is what is tested
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    write_gguf(model, path / "model-q8_0.gguf")
    (path / "rules.yaml").write_text(torch_rules())
    return path


@pytest.mark.parametrize("weights", ["gguf", "safetensors"])
def test_generate_prints_text_load_time_rss_and_speeds(model_dir, weights, capsys):
    args = [
        "generate",
        "--model",
        str(model_dir),
        "--rules",
        str(model_dir / "rules.yaml"),
        "--prompt",
        "ktinject runs",
        "--max-new-tokens",
        "5",
        "--no-progress",
    ]
    if weights == "gguf":
        args += ["--gguf", "model-q8_0.gguf"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"^loaded in \d+\.\d s, peak RSS \d+\.\d\d GiB$", out, re.M)
    assert re.search(r"^ktinject runs", out, re.M)
    assert re.search(r"^prefill: 13 tokens in \d+\.\d\d s \(\d+\.\d tokens/s\)$", out, re.M)
    assert re.search(r"^decode:  4 tokens in \d+\.\d\d s \(\d+\.\d tokens/s\)$", out, re.M)
    assert re.search(r"^5 new tokens; load \d+\.\d s, peak RSS \d+\.\d\d GiB$", out, re.M)


def test_generate_needs_weights(capsys):
    assert main(["generate", "--prompt", "x"]) == 2
    assert "error: give --model DIR, --gguf FILE, or both" in capsys.readouterr().err


def test_generate_without_tokenizer_says_so(model_dir, tmp_path, capsys):
    alone = tmp_path / "alone.gguf"  # no tokenizer files next to it, no tokenizer metadata in it
    alone.write_bytes((model_dir / "model-q8_0.gguf").read_bytes())
    assert (
        main(
            [
                "generate",
                "--gguf",
                str(alone),
                "--rules",
                str(model_dir / "rules.yaml"),
                "--prompt",
                "x",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "error: no tokenizer found" in capsys.readouterr().err
