"""The OpenAI HTTP API (``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``, ``/health``) over an ``Engine``.

This is the one module that imports fastapi. Every error is an OpenAI error body with a fitting status:
400 for a bad request (the field named in ``param``), 404 for an unknown model or path, 503 while the model
loads, 500 only when the model itself raised, and never a traceback in a body (the log has it).

Streaming (``"stream": true``) sends server-sent events, one chunk per token that adds text, then a chunk
with ``finish_reason`` and ``data: [DONE]``. A client that disconnects cancels its request: the engine
drops it before the next token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ktinject.serving.engine import Engine, EngineNotReady, Output
from ktinject.serving.engine import Request as EngineRequest
from ktinject.serving.protocol import ChatCompletionRequest, CompletionRequest, error_body, validation_message
from ktinject.serving.sampling import RequestError

log = logging.getLogger(__name__)

_DISCONNECT_POLL_S = 0.25


class ApiError(Exception):
    """An error answer: status and OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type=type, param=param, code=code)


def _from_request_error(exc: RequestError) -> ApiError:
    if isinstance(exc, EngineNotReady):
        return ApiError(503, str(exc), type="server_error", code=exc.code)
    return ApiError(400, str(exc), param=exc.param, code=exc.code)


def create_app(engine: Engine, model_id: str) -> FastAPI:
    """The FastAPI application serving ``engine``'s model under the name ``model_id``."""
    app = FastAPI(title="ktinject", docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer = engine.tokenizer
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), code=code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error while answering a request")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", type="server_error"), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": engine.state, "model": model_id, **engine.stats()}
        if engine.state == "failed":
            body["error"] = str(engine.load_error)
        return JSONResponse(body, status_code=200 if engine.state == "ready" else 503)

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "ktinject"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        _require_ready(engine)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        _require_ready(engine)
        _require_model(name, model_id)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _require_ready(engine)
        body = _parse(ChatCompletionRequest, await _json(request))
        _require_model(body.model, model_id)
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(
                400,
                "the model's tokenizer has no chat template: use /v1/completions with a plain prompt",
                param="messages",
                code="no_chat_template",
            )
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - templates raise on what they refuse (e.g. roles out of order)
            raise ApiError(400, f"the chat template refused these messages: {exc}", param="messages") from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return await _generate(request, engine, body, ids, chat=True, model_id=model_id)

    @app.post("/v1/completions")
    async def completions(request: Request):
        _require_ready(engine)
        body = _parse(CompletionRequest, await _json(request))
        _require_model(body.model, model_id)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            ids = list(prompt)
        else:
            text = prompt[0] if isinstance(prompt, list) and prompt else prompt
            ids = tokenizer(text or "")["input_ids"]
        return await _generate(request, engine, body, ids, chat=False, model_id=model_id)

    return app


def _require_ready(engine: Engine) -> None:
    if engine.state != "ready":
        raise _from_request_error(EngineNotReady(engine.state, engine.load_error))


def _require_model(name: str, model_id: str) -> None:
    if name != model_id:
        raise ApiError(
            404,
            f"model {name!r} does not exist (this server serves {model_id!r})",
            param="model",
            code="model_not_found",
        )


async def _json(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _parse(model, body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise ApiError(400, message, param=param) from None


async def _generate(http: Request, engine: Engine, body, prompt_ids: list[int], *, chat: bool, model_id: str):
    try:
        params = engine.params(**body.sampling_kwargs())
    except RequestError as exc:
        raise _from_request_error(exc) from None
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Output] = asyncio.Queue()

    def sink(output: Output) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, output)

    try:
        request = engine.submit(prompt_ids, params, sink)
    except RequestError as exc:
        if exc.param == "messages" and not chat:
            exc.param = "prompt"
        raise _from_request_error(exc) from None
    response_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    shape = _Shape(response_id, model_id, chat)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(request, queue, shape, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    text, last = [], None
    try:
        while last is None:
            try:
                output = await asyncio.wait_for(queue.get(), _DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    request.cancel()
                    raise ApiError(499, "client disconnected") from None
                continue
            text.append(output.text)
            if output.final:
                last = output
    finally:
        request.cancel()  # no-op once finished; stops the engine when this handler is cancelled
    if last.error is not None:
        raise ApiError(500, f"generation failed: {last.error}", type="server_error", code="generation_failed")
    return shape.full("".join(text), last)


class _Shape:
    """The JSON of chat vs. text completion answers and chunks."""

    def __init__(self, response_id: str, model_id: str, chat: bool) -> None:
        self.id, self.model, self.chat = response_id, model_id, chat
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}

    @staticmethod
    def usage(output: Output) -> dict:
        return {
            "prompt_tokens": output.prompt_tokens,
            "completion_tokens": output.completion_tokens,
            "total_tokens": output.prompt_tokens + output.completion_tokens,
        }

    def full(self, text: str, last: Output) -> dict:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": last.finish_reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
        return self._envelope(self.object, [choice], usage=self.usage(last))

    def chunk(self, text: str | None, finish_reason: str | None = None, *, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, last: Output) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, [], usage=self.usage(last))


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(
    request: EngineRequest, queue: asyncio.Queue, shape: _Shape, include_usage: bool
) -> AsyncIterator[str]:
    try:
        if shape.chat:
            yield _sse(shape.chunk(None, role=True))
        while True:
            output: Output = await queue.get()
            if output.error is not None:
                yield _sse(
                    error_body(f"generation failed: {output.error}", type="server_error", code="generation_failed")
                )
                break
            if output.text:
                yield _sse(shape.chunk(output.text))
            if output.finish_reason is not None:
                yield _sse(shape.chunk(None, output.finish_reason))
                if include_usage:
                    yield _sse(shape.usage_chunk(output))
                break
        yield "data: [DONE]\n\n"
    finally:
        request.cancel()  # the client went away (or we are done): the engine drops it before its next token
