"""The engine: one thread owns the model and serves every request, decoding the running ones as one batch.

Why one thread: the model, its KV caches and the CPU experts' pool are not meant to be driven from several
threads at once, and a batch is what makes serving several clients cheap on a MoE model — one decode step
reads each expert's weights once for all the requests whose tokens route to it.

Each loop turn: drop cancelled requests, admit waiting ones (first come, first served, up to
``max_batch_size`` running) by prefilling each alone — the exact computation a lone request gets, so its
tokens do not depend on who else is running — then one decode step over all running requests (a
``PaddedBatch``). Outputs go to each request's ``sink`` from the engine thread; a sink must not block.

If the model raises, the requests in that step get an error ``Output`` and the engine goes on with the next.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence

import torch

from ktinject.serving.batch import PaddedBatch, supports_batching
from ktinject.serving.sampling import RequestError, SamplingParams, model_sampling_defaults, sample
from ktinject.serving.text import TextStream

log = logging.getLogger(__name__)

__all__ = ["Engine", "Output", "Request", "RequestError"]


@dataclasses.dataclass(frozen=True)
class Output:
    """What a request produced since its previous output; the last one has ``finish_reason`` or ``error`` set.

    ``finish_reason``: ``"stop"`` (end-of-sequence token or stop string), ``"length"`` (``max_tokens`` or the
    end of the context), ``"cancelled"``. Token counts are totals so far.
    """

    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


Sink = Callable[[Output], None]


class Request:
    """One generation: its prompt, its sampling, where its outputs go and whether its client still wants them."""

    _ids = itertools.count(1)

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, sink: Sink, tokenizer) -> None:
        self.id = next(self._ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.generator = params.make_generator()
        self.text = TextStream(tokenizer, self.prompt_ids, params.stop)
        self.completion_tokens = 0
        self.last_token: int | None = None
        self.finished = False
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop generating for this request (thread-safe); the engine drops it before its next token."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def cached_tokens(self) -> int:
        """Positions this request occupies in the KV cache (the prompt and every token fed back)."""
        return len(self.prompt_ids) + max(self.completion_tokens - 1, 0)


class Engine:
    """Loads the model on its own thread, then serves ``submit``-ted requests until ``stop``.

    ``load`` builds the model (e.g. ``ktinject.from_pretrained`` with rules); while it runs ``state`` is
    ``"loading"`` and ``submit`` raises ``EngineNotReady``. ``default_params`` fill what a request leaves
    out; with ``model_defaults`` the model's ``generation_config`` sampling values take precedence over
    them. A failed load sets ``state = "failed"`` and ``load_error``, and calls ``on_load_failed`` (the
    server uses it to shut down).
    """

    def __init__(
        self,
        load: Callable[[], torch.nn.Module],
        tokenizer,
        *,
        max_batch_size: int = 8,
        default_params: dict | None = None,
        model_defaults: bool = False,
        on_load_failed: Callable[[BaseException], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise RequestError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self._load = load
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.default_params = dict(default_params or {})
        self._model_defaults = model_defaults
        self._on_load_failed = on_load_failed
        self.state = "loading"
        self.load_error: BaseException | None = None
        self.load_seconds: float | None = None
        self.model = None
        self.context_length: int | None = None
        self._eos: frozenset[int] = frozenset()
        self._cache_kwarg = "past_key_values"
        self._batching = True
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._batch = PaddedBatch()
        self._stopping = False
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="ktinject-engine", daemon=True)
        self.generated_tokens = 0  # every token sampled since start (for /health and tests)

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> Engine:
        self._thread.start()
        return self

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        """True once the model is loaded (False on timeout or a failed load)."""
        self._ready.wait(timeout)
        return self.state == "ready"

    def stop(self, timeout: float | None = 5.0) -> None:
        """Finish: pending requests get an error output; returns when the thread ended (or after ``timeout``)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def stats(self) -> dict:
        with self._cond:
            return {
                "running": len(self._running),
                "waiting": len(self._waiting),
                "generated_tokens": self.generated_tokens,
            }

    # -- requests --------------------------------------------------------------------------------------------

    def params(self, **given) -> SamplingParams:
        """``SamplingParams`` from a request's values (None = not given) over the model's defaults."""
        values = {**self.default_params, **{k: v for k, v in given.items() if v is not None}}
        return SamplingParams(**values)

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        """Raise ``RequestError`` for a prompt that cannot run: empty, or leaving no room in the context."""
        if not prompt_ids:
            raise RequestError("the prompt is empty (0 tokens)", param="prompt")
        vocab = self.vocab_size
        if vocab is not None:
            bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
            if bad:
                raise RequestError(f"token id {bad[0]} is out of the vocabulary (0..{vocab - 1})", param="prompt")
        if self.context_length is not None and len(prompt_ids) >= self.context_length:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.context_length} tokens "
                f"(the prompt must leave room for at least one new token)",
                param="messages",
                code="context_length_exceeded",
            )

    @property
    def vocab_size(self) -> int | None:
        if self.model is None:
            return None
        return self.model.get_input_embeddings().weight.shape[0]

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, sink: Sink) -> Request:
        """Queue a request; outputs go to ``sink`` from the engine thread. Raises ``EngineNotReady``/``RequestError``."""
        if self.state != "ready":
            raise EngineNotReady(self.state, self.load_error)
        self.check_prompt(prompt_ids)
        request = Request(prompt_ids, params, sink, self.tokenizer)
        with self._cond:
            if self._stopping:
                raise EngineNotReady("stopped", None)
            self._waiting.append(request)
            self._cond.notify_all()
        return request

    # -- the engine thread -----------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            start = time.perf_counter()
            self.model = self._load()
            self._prepare()
            self.load_seconds = time.perf_counter() - start
        except BaseException as exc:  # noqa: BLE001 - reported to whoever started the engine
            self.load_error = exc
            self.state = "failed"
            self._ready.set()
            if self._on_load_failed is not None:
                self._on_load_failed(exc)
            return
        self.state = "ready"
        self._ready.set()
        with torch.inference_mode():
            self._loop()
        self.state = "stopped"

    def _prepare(self) -> None:
        model = self.model
        model.eval()
        config = model.config.get_text_config()
        self.context_length = getattr(config, "max_position_embeddings", None)
        eos: set[int] = set()
        for value in (
            getattr(model.generation_config, "eos_token_id", None),
            getattr(self.tokenizer, "eos_token_id", None),
        ):
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, (list, tuple)):
                eos.update(int(v) for v in value)
        self._eos = frozenset(eos)
        parameters = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in parameters
        self._device = model.get_input_embeddings().weight.device
        if self._model_defaults:
            self.default_params.update(model_sampling_defaults(getattr(model, "generation_config", None)))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stopping:
                    break
                room = self._room()
                admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            self._drop_cancelled()
            for request in admitted:
                if request.cancelled:
                    self._finish(request, Output(finish_reason="cancelled"))
                else:
                    self._prefill(request)
            if self._running:
                self._decode_step()
        self._fail_all("the server is shutting down")

    def _room(self) -> int:
        limit = self.max_batch_size if self._batching else 1
        return max(limit - len(self._running), 0)

    def _drop_cancelled(self) -> None:
        keep = [i for i, r in enumerate(self._running) if not r.cancelled]
        if len(keep) == len(self._running):
            return
        for r in self._running:
            if r.cancelled:
                self._finish(r, Output(finish_reason="cancelled"))
        self._batch.keep(keep)
        with self._cond:
            self._running = [self._running[i] for i in keep]

    def _forward(self, input_ids, position_ids, attention_mask, cache):
        kwargs = {self._cache_kwarg: cache, "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, **kwargs)
        return out.logits[:, -1, :]

    def _prefill(self, request: Request) -> None:
        from transformers import DynamicCache

        n = len(request.prompt_ids)
        ids = torch.tensor([request.prompt_ids], dtype=torch.long, device=self._device)
        positions = torch.arange(n, device=self._device).unsqueeze(0)
        cache = DynamicCache(config=self.model.config)
        try:
            logits = self._forward(ids, positions, torch.ones_like(ids), cache)
            token = sample(logits[0], request.params, request.generator)
        except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the server
            self._fail([request], exc)
            return
        if not self._accept(request, token):
            return
        if self._batching and not supports_batching(cache):
            kinds = sorted({type(layer).__name__ for layer in cache.layers})
            log.warning("KV cache layers %s cannot be batched; serving one request at a time", ", ".join(kinds))
            self._batching = False
        self._batch.add(cache, n)
        with self._cond:
            self._running.append(request)

    def _decode_step(self) -> None:
        running = self._running
        ids = torch.tensor([[r.last_token] for r in running], dtype=torch.long, device=self._device)
        positions = torch.tensor([[r.cached_tokens] for r in running], dtype=torch.long, device=self._device)
        mask = self._batch.step_mask()
        try:
            logits = self._forward(ids, positions, mask, self._batch.cache)
            if all(r.params.greedy for r in running):
                tokens = torch.argmax(logits, dim=-1).tolist()
            else:
                tokens = [sample(logits[i], r.params, r.generator) for i, r in enumerate(running)]
        except Exception as exc:  # noqa: BLE001 - the batch's cache is unusable now: fail its requests, go on
            self._batch.clear()
            with self._cond:
                self._running = []
            self._fail(running, exc)
            return
        self._batch.advance(mask)
        keep = [i for i, (r, t) in enumerate(zip(running, tokens)) if self._accept(r, t)]
        if len(keep) != len(running):
            self._batch.keep(keep)
            with self._cond:
                self._running = [running[i] for i in keep]

    def _accept(self, request: Request, token: int) -> bool:
        """Record a sampled token and send its text; False when the request is finished by it."""
        request.completion_tokens += 1
        request.last_token = token
        self.generated_tokens += 1
        params = request.params
        if token in self._eos and not params.ignore_eos:
            self._finish(request, Output(text=request.text.flush(), finish_reason="stop"))
            return False
        delta = request.text.push(token)
        if request.text.stopped:
            self._finish(request, Output(text=delta, finish_reason="stop"))
            return False
        full_context = self.context_length is not None and request.cached_tokens + 1 >= self.context_length
        if request.completion_tokens == params.max_tokens or full_context:
            self._finish(request, Output(text=delta + request.text.flush(), finish_reason="length"))
            return False
        if request.cancelled:
            self._finish(request, Output(text=delta, finish_reason="cancelled"))
            return False
        if delta:
            self._send(request, Output(text=delta))
        return not request.finished

    def _send(self, request: Request, output: Output) -> None:
        output = dataclasses.replace(
            output, prompt_tokens=len(request.prompt_ids), completion_tokens=request.completion_tokens
        )
        try:
            request.sink(output)
        except Exception:  # noqa: BLE001 - a client that went away: stop its generation
            log.debug("request %d: its sink failed; cancelling it", request.id, exc_info=True)
            request.cancel()
            request.finished = True

    def _finish(self, request: Request, output: Output) -> None:
        request.finished = True
        self._send(request, output)

    def _fail(self, requests: list[Request], exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
        log.error("generation failed for %d request(s): %s", len(requests), message, exc_info=exc)
        for r in requests:
            self._finish(r, Output(error=message))

    def _fail_all(self, message: str) -> None:
        with self._cond:
            pending = list(self._waiting) + list(self._running)
            self._waiting.clear()
            self._running = []
        self._batch.clear()
        for r in pending:
            self._finish(r, Output(error=message))


class EngineNotReady(RequestError):
    """The model is still loading (or failed to load, or the engine stopped): the server answers 503."""

    def __init__(self, state: str, load_error: BaseException | None) -> None:
        detail = {"loading": "the model is still loading", "stopped": "the server is shutting down"}.get(state)
        if detail is None:
            detail = f"the model failed to load: {load_error}"
        super().__init__(detail, code="model_not_ready")
        self.state = state
