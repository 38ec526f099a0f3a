"""`generate` sampling/streaming/threads, the interactive `chat`, and how `serve` starts and fails."""

from __future__ import annotations

import queue
import re
import socket
import sys

import pytest
from tiny_chat_model import save_tiny_model_dir, tiny_tokenizer

import ktinject
from ktinject.cli import main
from ktinject.errors import KtInjectError


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-chat-model")
    save_tiny_model_dir(path)
    return path


def generate(capsys, chat_dir, *flags) -> str:
    args = [
        "generate",
        "--model",
        str(chat_dir),
        "--set",
        "gpu=cpu",
        "--prompt",
        "Once",
        "--max-new-tokens",
        "12",
        "--no-progress",
        *flags,
    ]
    assert main(args) == 0
    return capsys.readouterr().out


def text_of(out: str) -> str:
    """The generated text: the lines between the load report and the speeds."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("loaded in")) + 1
    end = next(i for i, line in enumerate(lines) if line.startswith("prefill:"))
    return "\n".join(lines[start:end])


def test_generate_sampling_is_seeded_and_stream_prints_the_same_text(capsys, chat_dir):
    greedy = text_of(generate(capsys, chat_dir))
    assert greedy.startswith("Once")
    assert text_of(generate(capsys, chat_dir, "--stream")) == greedy
    sampled = text_of(generate(capsys, chat_dir, "--temperature", "1.0", "--top-k", "40", "--seed", "3"))
    assert sampled != greedy  # it does sample (12 tokens from 40 candidates each)
    streamed = text_of(generate(capsys, chat_dir, "--temperature", "1.0", "--top-k", "40", "--seed", "3", "--stream"))
    assert streamed == sampled  # the same seed, the same text


def test_threads_is_the_cpu_threads_rule_variable(capsys, chat_dir, monkeypatch):
    seen = {}

    def capture(*args, **kwargs):
        seen.update(kwargs["vars"])
        raise KtInjectError("stop after the arguments")

    monkeypatch.setattr(ktinject, "from_pretrained", capture)
    assert main(["generate", "--model", str(chat_dir), "--prompt", "x", "--threads", "3", "--set", "gpu=cpu"]) == 2
    assert seen == {"gpu": "cpu", "cpu_threads": 3}
    assert "error: stop after the arguments" in capsys.readouterr().err


class _InterruptingQueue(queue.Queue):
    """The chat's output queue; the third token of the first answer arrives as a Ctrl-C instead."""

    armed = True

    def get(self, *args, **kwargs):
        item = super().get(*args, **kwargs)
        self.count = getattr(self, "count", 0) + 1
        if _InterruptingQueue.armed and self.count == 3:
            _InterruptingQueue.armed = False
            raise KeyboardInterrupt
        return item


def test_chat_streams_keeps_history_resets_and_survives_ctrl_c(capsys, chat_dir, monkeypatch):
    from ktinject.cli import chat
    from ktinject.serving import Engine

    _InterruptingQueue.armed = True
    inputs = iter(["hello", "more", "/reset", "again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(inputs))
    monkeypatch.setattr(chat.queue, "Queue", _InterruptingQueue)
    prompts, requests = [], []
    submit = Engine.submit

    def spy(self, ids, params, sink):
        prompts.append(tiny_tokenizer().decode(ids))
        requests.append(submit(self, ids, params, sink))
        return requests[-1]

    monkeypatch.setattr(Engine, "submit", spy)
    assert main(["chat", "--model", str(chat_dir), "--set", "gpu=cpu", "--no-progress", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "ready (" in out and "(conversation reset)" in out
    assert requests[0].cancelled and " [stopped]" in out  # Ctrl-C stopped the first answer, not the program
    first = re.match(r"user: hello\nassistant: (.*?)\nuser: more", prompts[1], re.S).group(1)
    assert len(first) == 2  # the two tokens shown before Ctrl-C stay in the history
    assert prompts[0] == "user: hello\nassistant:"
    assert prompts[1] == f"user: hello\nassistant: {first}\nuser: more\nassistant:"  # the history (the part shown)
    assert prompts[2] == "user: again\nassistant:"  # after /reset
    assert all(r.finished and not r.cancelled for r in requests[1:])


def test_serve_without_fastapi_says_how_to_install(capsys, monkeypatch, chat_dir):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    assert main(["serve", "--model", str(chat_dir)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: ktinject serve needs fastapi and uvicorn: pip install 'ktinject[serve]'"
    )


def test_serve_on_a_busy_port(capsys, chat_dir):
    pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(chat_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_serve_stops_with_the_load_error(capsys, tmp_path, chat_dir):
    pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
    (tmp_path / "config.json").write_bytes((chat_dir / "config.json").read_bytes())
    tiny_tokenizer().save_pretrained(tmp_path)  # a tokenizer, no weights
    assert main(["serve", "--model", str(tmp_path), "--set", "gpu=cpu", "--port", "0", "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert re.search(r"^ktinject serve: model '\S+' at http://127\.0\.0\.1:\d+/v1 \(loading", captured.out, re.M)
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in captured.err


def test_serve_listens_on_an_explicit_tcp_socket():
    # asyncio disables Nagle (TCP_NODELAY) only on connections of sockets made with IPPROTO_TCP; without it a
    # streamed answer's first chunk waited for the client's delayed ACK (+40 ms to the first token).
    from ktinject.cli.serve import _bind

    with _bind("127.0.0.1", 0) as sock:
        assert sock.proto == socket.IPPROTO_TCP and sock.getsockname()[1] > 0
