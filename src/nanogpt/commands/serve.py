"""The `nanogpt serve` command: bind the port, load the checkpoint, run the app (`nanogpt.serve.app`) on uvicorn.

The socket is bound before the model loads (a taken port costs no loading time) and the "on
http://HOST:PORT/v1" line is printed only once it is bound; uvicorn is handed that very socket.

    nanogpt serve --model runs/tiny --port 8000
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanogpt.commands.options import add_device, add_dtype, add_threads, apply_threads
from nanogpt.errors import ArgumentParser, UserError, missing_extra
from nanogpt.kernels.device import cpu_flags, emulated_bf16_warning, resolve_device
from nanogpt.kernels.quant import apply_dtype
from nanogpt.serve.app import create_app
from nanogpt.serve.engine import Engine
from nanogpt.serve.errors import DEFAULT_MAX_BODY_BYTES
from nanogpt.train.checkpoint import load_model

if TYPE_CHECKING:
    import torch


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="nanogpt serve", description="an OpenAI-compatible server for a checkpoint")
    p.add_argument("--model", required=True, help="run or checkpoint folder")
    p.add_argument("--name", help="model id in the API (default: the folder's name)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key-env", help="require `Authorization: Bearer $NAME` (the key is read from env var NAME)"
    )
    p.add_argument(
        "--max-batch",
        "--max-concurrent",
        type=int,
        default=32,
        help="sequences advanced together in one step (more wait in the queue)",
    )
    p.add_argument(
        "--max-queue", type=int, default=256, help="requests that may wait; beyond, 429 Retry-After"
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=64,
        help="prompt tokens read per step (all prompts together), so a long prompt never stalls the streams",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds a request may take, queue included (0: none)",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=10.0,
        help="on SIGTERM/SIGINT, how long running requests may finish",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"larger request bodies are refused with 413 (default {DEFAULT_MAX_BODY_BYTES}: 8 MiB)",
    )
    add_device(p)
    add_dtype(
        p,
        help="fp32, or bf16/fp16 autocast with decode on bf16/fp16 weight copies (~2x faster decode on CPU), "
        "or int8 weights (weight-only, fp32 activations)",
        int8=True,
    )
    add_threads(p)
    return p


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening; a port that cannot be had is one UserError.

    The command binds before it loads the model and says where it listens only once this succeeded; the
    bound socket itself goes to uvicorn, so no other process can take the port in between.
    """
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port; pass one in 1..65535 (or 0 for any free port)")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(
            f"--host {host!r} is not an address of this machine ({e}); pass 127.0.0.1, 0.0.0.0 or one of its IPs"
        ) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: rebind despite TIME_WAIT
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        where = f"{host} port {port}"
        if e.errno == errno.EADDRINUSE:
            fix = "stop the server using it or pass another --port (0 picks a free one)"
            raise UserError(f"{where} is already in use; {fix}") from None
        if e.errno == errno.EADDRNOTAVAIL:
            fix = "pass --host 127.0.0.1 (this machine only), 0.0.0.0 (every interface) or one of its IPs"
            raise UserError(f"cannot bind {where}: {host} is not an address of this machine; {fix}") from None
        if e.errno == errno.EACCES:
            raise UserError(
                f"cannot bind {where}: permission denied; pass a --port of 1024 or more"
            ) from None
        raise UserError(f"cannot bind {where} ({e.strerror}); pass another --host or --port") from None
    return sock


def exposure_warning(host: str, bound: str, api_key: str | None) -> str | None:
    """The one-line warning for a server others can reach without a key (`bound`: the address bound)."""
    if api_key is not None or ipaddress.ip_address(bound.split("%")[0]).is_loopback:
        return None
    return (
        f"nanogpt serve: warning: --host {host} without an API key: anyone who can reach this host can use "
        "the server; set a key with --api-key-env NAME (clients then send Authorization: Bearer KEY)"
    )


def check_flags(args: argparse.Namespace) -> str | None:
    """Every number flag in range, and the API key read from its variable (returned; None without one)."""
    for flag, value, low in (
        ("--max-batch", args.max_batch, 1),
        ("--max-queue", args.max_queue, 0),
        ("--prefill-chunk", args.prefill_chunk, 1),
    ):
        if value < low:
            raise UserError(f"{flag} {value} must be >= {low}")
    for flag, value in (("--request-timeout", args.request_timeout), ("--drain-seconds", args.drain_seconds)):
        if not 0 <= value < float("inf"):  # nan fails too
            raise UserError(f"{flag} {value} must be a number of seconds >= 0")
    if args.max_body_bytes < 1:
        raise UserError(f"--max-body-bytes {args.max_body_bytes} must be >= 1; e.g. --max-body-bytes 8388608")
    if not args.api_key_env:
        return None
    api_key = os.environ.get(args.api_key_env)
    if not api_key:
        raise UserError(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    return api_key


def make_engine(args: argparse.Namespace, device: torch.device) -> Engine:
    """The checkpoint loaded in the asked precision, in an engine run by this thread (see `Engine.run`)."""
    model = load_model(args.model, device=device)
    return Engine(
        model,
        args.name or Path(args.model).resolve().name,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk,
        dtype=apply_dtype(model, args.dtype),
        thread=False,  # it runs in this thread, below: see Engine.run
    )


def listen(sock: socket.socket, name: str, dtype: str) -> None:
    """Start listening and say where: from now on clients queue instead of being refused."""
    sock.listen(2048)  # uvicorn accepts them
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(f"nanogpt serve: {name} ({dtype}) on http://{url_host}:{port}/v1", file=sys.stderr, flush=True)
    print(f"nanogpt serve: the playground is at http://{url_host}:{port}/", file=sys.stderr, flush=True)


def run(app: Any, engine: Engine, sock: socket.socket, drain_seconds: float) -> None:
    """uvicorn in a thread of its own, the engine in this one, until SIGTERM/SIGINT (see `handle_exit`)."""
    import uvicorn

    # lifespan off: the app has no startup or shutdown hooks, and uvicorn's lifespan task, left pending
    # when a second signal skips the lifespan shutdown (force_exit), was cancelled as the loop closed and
    # Starlette logged that CancelledError as a traceback
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        # uvicorn annotates it int, and hands it to asyncio.timeout, which takes float seconds
        timeout_graceful_shutdown=drain_seconds + 5,  # type: ignore[arg-type]
    )
    server = uvicorn.Server(config)

    def serve_http() -> None:
        try:
            server.run(sockets=[sock])  # in this thread uvicorn leaves the signals to us
        finally:
            engine.close(0.0, wait=False)  # the HTTP side is gone (or never came up): so is the work

    def handle_exit(sig: int, frame: Any) -> None:
        """SIGTERM/SIGINT: stop accepting; running requests get --drain-seconds to finish; exit 0.

        A second signal stops at once.
        """
        if engine.closing:
            engine.close(0.0, wait=False)
            server.force_exit = True
        else:
            engine.close(drain_seconds, wait=False)
        server.should_exit = True

    signal.signal(signal.SIGTERM, handle_exit)
    signal.signal(signal.SIGINT, handle_exit)
    http_thread = threading.Thread(target=serve_http, name="nanogpt-http", daemon=True)
    http_thread.start()
    engine.run()  # every torch call of the server, in this one thread, until a signal closes it
    server.should_exit = True
    http_thread.join(timeout=drain_seconds + 10)
    # stopped: a signal from now on has nothing left to stop, and during the interpreter's teardown
    # Python's handlers are gone (the default one would end the process with -SIGTERM, not 0); an
    # ignored signal stays ignored through that teardown
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn  # noqa: F401 - only whether the extra is installed, before any work
    except ImportError:
        raise missing_extra("nanogpt serve needs FastAPI and uvicorn", "serve") from None
    api_key = check_flags(args)
    apply_threads(args)
    device = resolve_device(args.device)
    sock = bind(args.host, args.port)  # before the model loads: a taken port costs no loading time
    warning = exposure_warning(args.host, sock.getsockname()[0], api_key)
    if warning:  # at once, before anyone can connect (the socket listens once the model is loaded)
        print(warning, file=sys.stderr, flush=True)
    slow_bf16 = emulated_bf16_warning(device, args.dtype, cpu_flags())
    if slow_bf16:
        print(f"nanogpt serve: {slow_bf16}", file=sys.stderr, flush=True)
    with sock:
        engine = make_engine(args, device)
        app = create_app(
            engine,
            api_key,
            request_timeout=args.request_timeout or None,
            max_body_bytes=args.max_body_bytes,
            model_path=Path(args.model),
            dtype=args.dtype,
        )
        listen(sock, engine.name, args.dtype)
        run(app, engine, sock, args.drain_seconds)
    print(
        f"nanogpt serve: stopped; requests cancelled at shutdown: {engine.cancelled_at_close}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
