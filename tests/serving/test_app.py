"""The HTTP API in process (starlette's test client): statuses and OpenAI error bodies for every kind of failure."""

from __future__ import annotations

import json
import threading

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
from fastapi.testclient import TestClient  # noqa: E402
from tiny_chat_model import tiny_tokenizer  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

from ktinject.serving import Engine  # noqa: E402
from ktinject.serving.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3_moe", vocab_size=len(tiny_tokenizer()), max_position_embeddings=64)


@pytest.fixture
def serve():
    engines: list[Engine] = []

    def make(load, tokenizer=None) -> TestClient:
        engine = Engine(
            load, tokenizer or tiny_tokenizer(), default_params={"temperature": 1.0}, model_defaults=True
        ).start()
        engines.append(engine)
        return TestClient(create_app(engine, "tiny"), raise_server_exceptions=False)

    yield make
    for engine in engines:
        engine.stop()


def ready(client: TestClient) -> TestClient:
    for _ in range(300):
        if client.get("/health").status_code == 200:
            return client
        threading.Event().wait(0.05)
    raise AssertionError(client.get("/health").json())


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return body["error"]


def test_503_while_loading_then_ready(serve, model):
    release = threading.Event()
    client = serve(lambda: (release.wait(30), model)[1])
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "loading"
    err = error_of(client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"}), 503)
    assert err["message"] == "the model is still loading" and err["code"] == "model_not_ready"
    error_of(client.get("/v1/models"), 503)
    release.set()
    ready(client)
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"


def test_failed_load_is_503_with_the_reason(serve):
    def broken():
        raise OSError("weights file truncated")

    client = serve(broken)
    for _ in range(300):
        health = client.get("/health")
        if health.json()["status"] != "loading":
            break
        threading.Event().wait(0.02)
    assert health.status_code == 503 and health.json()["error"] == "weights file truncated"
    err = error_of(
        client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]}), 503
    )
    assert err["message"] == "the model failed to load: weights file truncated"


BAD = [
    (
        "/v1/completions",
        {"model": "tiny", "prompt": "hi", "logit_bias": {}},
        400,
        "logit_bias",
        "logit_bias: unknown parameter",
    ),
    (
        "/v1/completions",
        {"model": "tiny", "prompt": "hi", "temperature": 2.5},
        400,
        "temperature",
        "less than or equal to 2",
    ),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "top_p": 0}, 400, "top_p", "greater than 0"),
    (
        "/v1/completions",
        {"model": "tiny", "prompt": "hi", "max_tokens": 0},
        400,
        "max_tokens",
        "greater than or equal to 1",
    ),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 2}, 400, "n", "only n=1 is supported, got 2"),
    (
        "/v1/completions",
        {"model": "tiny", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]},
        400,
        "stop",
        "at most 4 stop strings",
    ),
    (
        "/v1/completions",
        {"model": "tiny", "prompt": "hi", "frequency_penalty": 0.5},
        400,
        "frequency_penalty",
        "penalties are not supported",
    ),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt", "one prompt per request"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt", "the prompt is empty (0 tokens)"),
    ("/v1/completions", {"model": "tiny", "prompt": [3, 900]}, 400, "prompt", "token id 900 is out of the vocabulary"),
    (
        "/v1/completions",
        {"model": "tiny", "prompt": "x" * 64},
        400,
        "prompt",
        "the prompt has 64 tokens; the model's context is 64 tokens",
    ),
    ("/v1/completions", {"prompt": "hi"}, 400, "model", "model: missing required parameter"),
    (
        "/v1/completions",
        {"model": "gpt-4", "prompt": "hi"},
        404,
        "model",
        "model 'gpt-4' does not exist (this server serves 'tiny')",
    ),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages", "at least 1 item"),
    (
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages.0.role",
        "Input should be",
    ),
    (
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": []},
        400,
        "tools",
        "unknown parameter",
    ),
    (
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": True},
        400,
        "logprobs",
        "",
    ),
]


@pytest.mark.parametrize("path, body, status, param, message", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_the_documented_status_and_error(serve, model, path, body, status, param, message):
    client = ready(serve(lambda: model))
    err = error_of(client.post(path, json=body), status)
    assert err["param"] == param and message in err["message"]
    assert err["type"] == "invalid_request_error"
    if "context is" in message:
        assert err["code"] == "context_length_exceeded"


def test_malformed_bodies_and_unknown_paths(serve, model):
    client = ready(serve(lambda: model))
    assert "not valid JSON" in error_of(client.post("/v1/completions", content=b"{nope"), 400)["message"]
    assert "must be a JSON object" in error_of(client.post("/v1/completions", json=[1]), 400)["message"]
    assert error_of(client.get("/v2/everything"), 404)["code"] == "not_found"
    assert error_of(client.get("/v1/completions"), 405)["code"] == "method_not_allowed"


def test_chat_without_a_template_is_400(serve, model):
    client = ready(serve(lambda: model, tiny_tokenizer(chat_template=None)))
    err = error_of(
        client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]}), 400
    )
    assert err["code"] == "no_chat_template" and "use /v1/completions" in err["message"]


def test_a_template_refusing_the_messages_is_400(serve, model):
    tokenizer = tiny_tokenizer(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}x"
    )
    client = ready(serve(lambda: model, tokenizer))
    err = error_of(
        client.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "assistant", "content": "x"}]}
        ),
        400,
    )
    assert "first message must be from the user" in err["message"]


def test_a_model_error_is_a_500_json_and_the_server_goes_on(serve, model):
    client = ready(serve(lambda: model))
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    expected = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    original = model.forward

    def broken(*args, **kwargs):
        if kwargs["input_ids"].shape[1] == 1:
            raise RuntimeError("expert kernel failed")
        return original(*args, **kwargs)

    model.forward = broken
    try:
        err = error_of(client.post("/v1/completions", json=body), 500)
        assert err == {
            "message": "generation failed: RuntimeError: expert kernel failed",
            "type": "server_error",
            "param": None,
            "code": "generation_failed",
        }
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert response.status_code == 200  # the stream had started: the error is its last event
        assert json.loads(events[-2])["error"]["message"] == "generation failed: RuntimeError: expert kernel failed"
        assert events[-1] == "[DONE]"
    finally:
        model.forward = original
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == expected


def test_stream_usage_chunk_when_asked(serve, model):
    client = ready(serve(lambda: model))
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks[1:-1]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 19,
        "completion_tokens": 3,
        "total_tokens": 22,
    }
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
