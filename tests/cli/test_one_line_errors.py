"""Mistakes on the command line are one line on stderr (exit code 2), found before any weight is loaded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny_chat_model import save_tiny_model_dir, tiny_tokenizer

import ktinject
from ktinject.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-chat-model")
    save_tiny_model_dir(path)
    return path


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    """Weights and a tokenizer without a chat template."""
    path = tmp_path_factory.mktemp("cli-plain-model")
    save_tiny_model_dir(path, chat_template=None)
    return path


@pytest.fixture(scope="module")
def no_tokenizer_dir(tmp_path_factory, chat_dir):
    path = tmp_path_factory.mktemp("cli-no-tokenizer")
    for name in ("config.json", "model.safetensors"):
        (path / name).write_bytes((chat_dir / name).read_bytes())
    return path


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command loads weights: every error here must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained was called before the error")

    monkeypatch.setattr(ktinject, "from_pretrained", refuse)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_generate_without_tokenizer_files(capsys, no_tokenizer_dir, no_loading):
    code, out, err = run(capsys, "generate", "--model", str(no_tokenizer_dir), "--prompt", "hi", "--set", "gpu=cpu")
    assert code == 2 and out == ""
    assert one_line(err) == (
        f"error: no tokenizer found ({no_tokenizer_dir} has no tokenizer files (expected one of "
        "tokenizer.json, tokenizer_config.json, tokenizer.model, vocab.json, spiece.model, vocab.txt, "
        "tokenizer.tiktoken))"
    )


def test_generate_with_an_empty_tokenizer(capsys, tmp_path, chat_dir, no_loading):
    (tmp_path / "config.json").write_bytes((chat_dir / "config.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"}))
    code, _, err = run(capsys, "generate", "--model", str(tmp_path), "--prompt", "hi")
    assert code == 2
    assert one_line(err) == f"error: no tokenizer found ({tmp_path}: the tokenizer is empty (1 tokens))"


def test_generate_empty_prompt(capsys, chat_dir, no_loading):
    code, _, err = run(capsys, "generate", "--model", str(chat_dir), "--prompt", "")
    assert code == 2 and one_line(err) == "error: --prompt is empty: give the text to continue"


def test_generate_zero_new_tokens(capsys, chat_dir, no_loading):
    code, _, err = run(capsys, "generate", "--model", str(chat_dir), "--prompt", "hi", "--max-new-tokens", "0")
    assert code == 2 and one_line(err) == "error: --max-new-tokens must be at least 1, got 0"


def test_generate_chat_without_a_template(capsys, plain_dir, no_loading):
    code, _, err = run(capsys, "generate", "--model", str(plain_dir), "--prompt", "hi", "--chat")
    assert code == 2
    assert (
        one_line(err)
        == f"error: the tokenizer of {plain_dir} has no chat template (run without --chat, or use a chat model)"
    )


def test_chat_command_without_a_template(capsys, plain_dir, no_loading):
    code, _, err = run(capsys, "chat", "--model", str(plain_dir))
    assert code == 2 and "has no chat template" in one_line(err)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--top-k", "5"],
            "error: --top-k applies only when sampling: add --temperature T (> 0); greedy is the default",
        ),
        (
            ["--seed", "1", "--top-p", "0.5"],
            "error: --top-p, --seed apply only when sampling: add --temperature T (> 0); greedy is the default",
        ),
        (["--temperature", "0.7", "--top-p", "1.5"], "error: --top-p must be in (0, 1], got 1.5"),
        (["--temperature", "-1"], "error: --temperature must be 0 (greedy) or positive, got -1.0"),
        (["--threads", "-2"], "error: --threads must be 0 (all CPUs) or positive, got -2"),
        (["--threads", "2", "--set", "cpu_threads=4"], "error: --threads 2 conflicts with --set cpu_threads=4"),
    ],
)
def test_generate_flag_values(capsys, chat_dir, no_loading, flags, message):
    code, _, err = run(capsys, "generate", "--model", str(chat_dir), "--prompt", "hi", *flags)
    assert code == 2 and one_line(err) == message


def test_missing_model_dir(capsys, tmp_path, no_loading):
    code, _, err = run(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert code == 2 and one_line(err) == f"error: --model {tmp_path / 'nope'}: no such directory or file"


def test_plan_on_a_config_transformers_cannot_build(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    code, _, err = run(capsys, "plan", "--config", str(tmp_path))
    assert code == 2
    line = one_line(err)  # transformers' page-long list of model classes is not printed
    assert line.startswith("error: transformers ") and "causal LM" in line and "'clip' config" in line


def test_plan_on_an_unknown_model_type(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_family"}))
    code, _, err = run(capsys, "plan", "--config", str(tmp_path))
    assert code == 2
    line = one_line(err)
    assert (
        line.startswith(f"error: {tmp_path / 'config.json'}: transformers cannot read this config: ")
        and "no_such_family" in line
    )


def test_doctor_with_a_bad_isa_reports_it(capsys, monkeypatch):
    monkeypatch.setenv("KTINJECT_ISA", "bogus")
    code, out, err = run(capsys, "doctor")
    assert code == 0 and err == ""
    row = next(line for line in out.splitlines() if line.startswith("kernel path"))
    assert "ERROR: KTINJECT_ISA: unknown ISA 'bogus' (expected scalar, avx2 or avx512)" in row
    assert "numa nodes" in out and "cpu operators default" in out  # the other rows are still there


def test_debug_shows_the_traceback(capsys, tmp_path):
    code, _, err = run(capsys, "--debug", "plan", "--config", str(tmp_path / "nope"))
    assert code == 2
    assert "Traceback (most recent call last)" in err
    assert (
        err.strip().splitlines()[-1]
        == f"error: config not found: {tmp_path / 'nope'} (give a model directory or a config.json)"
    )


def test_unexpected_errors_are_one_line_too(capsys, monkeypatch):
    from ktinject.cli import validate

    def boom(args):
        raise RuntimeError("something inside broke\nwith details on the next line")

    monkeypatch.setattr(validate, "run", boom)
    code, _, err = run(capsys, "validate", "llama")
    assert code == 1
    assert one_line(err) == "error: RuntimeError: something inside broke (run with --debug for the traceback)"


def test_version_and_python_dash_m(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"ktinject {ktinject.__version__}"
    result = subprocess.run(
        [sys.executable, "-m", "ktinject", "--version"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == f"ktinject {ktinject.__version__}"


def test_tiny_tokenizer_round_trips():
    tok = tiny_tokenizer()
    assert tok.decode(tok("Hi there!\n")["input_ids"]) == "Hi there!\n"
