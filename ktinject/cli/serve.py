"""``ktinject serve --model DIR``: the OpenAI HTTP API (chat and text completions, streaming) over an optimized model.

The port is open at once: the model loads on the engine thread meanwhile (``/health`` and the API answer
503 until it is ready). A failed load stops the server with the loader's one-line error (exit code 2).
"""

from __future__ import annotations

import logging
import socket
import sys

from ktinject.cli.model_options import (
    add_model_options,
    check_model_args,
    load_model,
    load_tokenizer,
    model_name,
    model_vars,
)
from ktinject.errors import KtInjectError

INSTALL_HINT = "ktinject serve needs fastapi and uvicorn: pip install 'ktinject[serve]'"
OPENAI_DEFAULT_TEMPERATURE = 1.0


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve an optimized model over the OpenAI HTTP API (FastAPI + uvicorn)")
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--model-name", default=None, help="the model's name in the API (default: the directory's name)")
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="requests decoded together in one batch (default 8); more wait in a first-come queue",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    from ktinject.serving import Engine
    from ktinject.serving.app import create_app

    check_model_args(args)
    if args.max_batch_size < 1:
        raise KtInjectError(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    vars = model_vars(args)
    tokenizer = load_tokenizer(args.model, args.gguf)
    name = args.model_name or model_name(args)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]

    def stop_server(_exc: BaseException) -> None:
        server.should_exit = True  # the loader failed: leave uvicorn's loop; run() reports the error

    engine = Engine(
        lambda: load_model(args, vars=vars),
        tokenizer,
        max_batch_size=args.max_batch_size,
        default_params={"temperature": OPENAI_DEFAULT_TEMPERATURE},
        model_defaults=True,
        on_load_failed=stop_server,
    )
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(engine, name),
            access_log=verbose,
            log_level="debug" if verbose else "warning",
            timeout_graceful_shutdown=3,
        )
    )
    shown = f"[{host}]" if ":" in host else host
    print(
        f"ktinject serve: model '{name}' at http://{shown}:{port}/v1 (loading; /health says when it is ready)",
        flush=True,
    )
    engine.start()
    _announce_when_ready(engine, name)
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
    if engine.state == "failed":
        raise engine.load_error
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so the port (also a free one for ``--port 0``) is known before serving.

    Created as an explicit TCP socket: asyncio turns Nagle's algorithm off (``TCP_NODELAY``) only on connections
    whose socket says IPPROTO_TCP, and with Nagle on, a streamed answer's headers and first chunk (two writes)
    wait for the client's delayed ACK: +40 ms to the first token on Linux.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise KtInjectError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _announce_when_ready(engine, name: str) -> None:
    import threading

    def announce() -> None:
        if engine.wait_until_loaded():
            print(f"ktinject serve: '{name}' ready (loaded in {engine.load_seconds:.1f} s)", flush=True)

    threading.Thread(target=announce, name="ktinject-ready", daemon=True).start()
