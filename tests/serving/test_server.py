"""`ktinject serve` as a user runs it: a real server process on a free port, driven by the official openai client."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai", reason="the test extra (openai) is not installed")
httpx = pytest.importorskip("httpx", reason="the test extra (httpx) is not installed")
pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")

from tiny_chat_model import tiny_tokenizer  # noqa: E402

START_TIMEOUT_S = 180
GREEDY = {"temperature": 0}
FIXED_LENGTH = {"extra_body": {"ignore_eos": True}}


class ServerProcess:
    """``python -m ktinject serve`` in a subprocess; its output is kept to explain a failure."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ktinject", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._new: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)
        self._new.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        for line in list(self.lines):
            if (match := re.search(pattern, line)) is not None:
                return match
        while time.monotonic() < deadline:
            try:
                line = self._new.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            if line is None:
                break
            if (match := re.search(pattern, line)) is not None:
                return match
        raise AssertionError(f"server never printed {pattern!r}; its output:\n" + "\n".join(self.lines[-40:]))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    proc = ServerProcess(
        [
            "serve",
            "--model",
            str(tiny_model_dir),
            "--set",
            "gpu=cpu",
            "--port",
            "0",
            "--model-name",
            "tiny",
            "--max-batch-size",
            "4",
            "--no-progress",
        ]
    )
    try:
        url = proc.wait_for(r"at (http://127\.0\.0\.1:\d+/v1)", START_TIMEOUT_S).group(1)
        proc.wait_for(r"'tiny' ready \(loaded in", START_TIMEOUT_S)
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=60)


def health(server: str) -> dict:
    return httpx.get(server.removesuffix("/v1") + "/health", timeout=10).json()


def chat(client, content: str, **kwargs):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kwargs)


def streamed_chat(client, content: str, **kwargs) -> tuple[str, str | None, int]:
    text, finish, chunks = "", None, 0
    for chunk in chat(client, content, stream=True, **kwargs):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
            chunks += 1
    return text, finish, chunks


def test_models_list(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_chat_streamed_equals_non_streamed(client):
    whole = chat(client, "hello", max_tokens=12, **GREEDY, **FIXED_LENGTH)
    prompt_tokens = len(tiny_tokenizer()("user: hello\nassistant:")["input_ids"])
    assert whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (
        prompt_tokens,
        12,
        prompt_tokens + 12,
    )
    text, finish, chunks = streamed_chat(client, "hello", max_tokens=12, **GREEDY, **FIXED_LENGTH)
    assert (text, finish) == (whole.choices[0].message.content, "length")
    assert chunks == 1 + len(text) + 1  # role, one per character token, the finish chunk


def test_completions_streamed_equals_non_streamed(client):
    whole = client.completions.create(model="tiny", prompt="Once upon", max_tokens=10, **GREEDY, **FIXED_LENGTH)
    assert whole.usage.completion_tokens == 10 and whole.usage.prompt_tokens == len("Once upon")
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt="Once upon", max_tokens=10, stream=True, **GREEDY, **FIXED_LENGTH
        )
    ]
    assert "".join(pieces) == whole.choices[0].text


def test_seeded_sampling_is_reproducible(client):
    runs = [
        chat(client, "tell me", max_tokens=16, temperature=1.0, top_p=0.95, seed=42, **FIXED_LENGTH)
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_stop_string_ends_the_answer(client):
    full = (
        client.completions.create(model="tiny", prompt="abc", max_tokens=20, **GREEDY, **FIXED_LENGTH).choices[0].text
    )
    stop = full[6:8]
    cut = client.completions.create(model="tiny", prompt="abc", max_tokens=20, stop=[stop], **GREEDY, **FIXED_LENGTH)
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_four_concurrent_streams_each_equal_their_single_run(client):
    prompts = ["first question", "b", "a somewhat longer third prompt", "4th"]
    alone = [streamed_chat(client, p, max_tokens=16, **GREEDY, **FIXED_LENGTH)[0] for p in prompts]
    together: list = [None] * 4
    start = threading.Barrier(4)

    def worker(i: int) -> None:
        start.wait()
        together[i] = streamed_chat(client, prompts[i], max_tokens=16, **GREEDY, **FIXED_LENGTH)[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone


def test_bad_requests_are_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404 and info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, "x", extra_body={"mirostat": 2})
    assert info.value.status_code == 400 and "mirostat: unknown parameter" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, "x" * 600)
    assert info.value.code == "context_length_exceeded" and "context is 512 tokens" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, "x", temperature=5)
    assert info.value.param == "temperature"


def test_a_client_disconnect_frees_its_slot(server):
    before = health(server)["generated_tokens"]
    body = {"model": "tiny", "prompt": "go", "max_tokens": 480, "stream": True, "ignore_eos": True, **GREEDY}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server}/completions", json=body) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]  # three chunks and their blank separators
    assert received[0].startswith("data: ")
    deadline = time.monotonic() + 20
    while (state := health(server))["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state["running"] == 0 and state["waiting"] == 0
    assert state["generated_tokens"] - before < 240  # it stopped long before max_tokens
    assert health(server)["generated_tokens"] == state["generated_tokens"]
