"""`pg-edge serve MODEL [--host 127.0.0.1] [--port 8080]`: the model behind a local HTTP server
in the OpenAI chat format (apps/server/http_server.py).

Ctrl-C (exit 0) and SIGTERM or SIGHUP (exit 128 + the signal: 143 for SIGTERM) shut it down
cleanly: no new connections, every waiting client answered 503 "server shutting down", the
running generation cut and its client told so, and the model's worker idle before the process
exits (MLX aborts a process that exits while one of its threads is computing)."""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

LOOPBACK_NAMES = ("localhost",)
EXIT_WAIT_S = 120  # the longest wait, at shutdown, for the model's current step (MLX aborts a
#                    process that exits while one of its threads computes)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI chat format)",
                       description="Serve a model on a local HTTP port: POST /v1/chat/completions "
                       "(OpenAI format, streaming), /v1/detect, /v1/segment; GET /v1/models, /health.")
    p.add_argument("model", help="converted folder, mlx-community folder, or hub id")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; any other needs --api-key)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("PG_EDGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $PG_EDGE_API_KEY, else none)")
    p.add_argument("--model-name", default=None,
                   help="model id clients use (default: the folder's name, or the hub id)")
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask (default 512)")
    p.add_argument("--max-body-mb", type=float, default=20, help="largest request body in MB (default 20)")
    p.add_argument("--queue-size", type=int, default=8,
                   help="requests that may wait for the model; more get 503 + Retry-After (default 8)")
    p.add_argument("--queue-timeout", type=float, default=120,
                   help="seconds a request may wait for the model before a 503 (default 120)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="let requests name http(s) image URLs for the server to fetch (default: refused)")
    p.add_argument("--allow-files", metavar="DIR", default=None,
                   help="let requests name image files inside DIR on this machine (default: refused)")
    p.add_argument("--allowed-host", metavar="NAME", action="append", default=[],
                   help="also answer requests whose Host (or browser Origin) names NAME; repeatable; "
                   "'*' for any (default: only localhost, 127.0.0.0/8, [::1] and the --host address)")
    p.add_argument("--pixel-budget", type=int, default=100_000_000,
                   help="decoded image pixels the server holds at once, over all requests; "
                   "more wait their turn (default 100000000)")
    p.add_argument("--request-timeout", type=float, default=30,
                   help="seconds a client has to send a whole request, head and body (default 30; "
                   "past it: 408 and the connection is closed)")
    p.add_argument("--vae", default=None, help="mask decoder for /v1/segment (default: "
                   "vae.safetensors in the model folder)")
    p.add_argument("--attention", choices=["window", "global"], default="window",
                   help="PaliGemma 2's sliding-window layers past 4096 tokens (896 px): window "
                   "(default, as transformers) or global (as big_vision, which trained them)")
    p.add_argument("--adapter", metavar="NAME=DIR", action="append", default=[],
                   help="a LoRA adapters folder (`pg-edge finetune --export adapters`) served on the "
                   "same base under NAME: a request's \"model\": NAME picks it; repeatable")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests generating at once, in one batch (default 8; 1: one at a time)")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    p.set_defaults(func=run)


def adapter_args(pairs: list[str], base: str) -> dict:
    """--adapter NAME=DIR values -> {NAME: DIR}, checked before the model loads."""
    from pg_edge.adapters import ADAPTER_CONFIG, ADAPTER_FILE
    from pg_edge.errors import PgEdgeError

    out: dict = {}
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        if not sep or not name or not folder:
            raise PgEdgeError(f"--adapter takes NAME=DIR, got {pair!r}")
        if name in out or name == base:
            raise PgEdgeError(f"--adapter {name}: the name is taken (by {'the base model' if name == base else 'another --adapter'})")
        missing = [f for f in (ADAPTER_CONFIG, ADAPTER_FILE) if not (Path(folder).expanduser() / f).is_file()]
        if missing:
            raise PgEdgeError(f"--adapter {name}: {folder} is not an adapters folder (no {' or '.join(missing)})")
        out[name] = Path(folder).expanduser()
    return out


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def model_id(model: str) -> str:
    """The id clients use: a folder's name as typed (pg2-3b-224), or the hub id itself."""
    path = Path(model).expanduser()
    return path.name if path.exists() else model


def _few_malloc_arenas(n: int = 2) -> None:
    """glibc gives each thread that allocates its own malloc arena, and a freed image buffer
    stays in the arena of the thread that freed it: with images decoded on connection threads
    and resized on the worker, the server's peak memory grew with every thread that had held
    one (docs/hardening.md, pixel budget). A few shared arenas keep the pixel budget a bound on
    memory too. No-op off glibc."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, n)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def run(args: argparse.Namespace) -> int:
    from pg_edge.checkpoint.atomic import Terminated
    from pg_edge.errors import PgEdgeError

    if not is_loopback(args.host) and not args.api_key:
        raise PgEdgeError(f"--host {args.host} exposes the model beyond this machine: pass "
                          "--api-key KEY (clients send 'Authorization: Bearer KEY')")
    for name in ("max_tokens", "queue_size"):
        if getattr(args, name) < (1 if name == "max_tokens" else 0):
            raise PgEdgeError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.max_body_mb <= 0 or args.queue_timeout <= 0 or args.request_timeout <= 0:
        raise PgEdgeError("--max-body-mb, --queue-timeout and --request-timeout must be positive")
    if args.pixel_budget < 1:
        raise PgEdgeError(f"--pixel-budget must be positive, got {args.pixel_budget}")
    for name in args.allowed_host:
        if not name or any(c in name for c in " /\\@") or not name.isascii():
            raise PgEdgeError(f"--allowed-host takes a host name or address, got {name!r}")
    if args.allow_files is not None and not Path(args.allow_files).is_dir():
        raise PgEdgeError(f"--allow-files: no such folder {args.allow_files}")
    if args.vae is not None and not Path(args.vae).is_file():
        raise PgEdgeError(f"mask decoder not found: {args.vae}")
    if args.max_batch < 1:
        raise PgEdgeError(f"--max-batch must be positive, got {args.max_batch}")
    name = args.model_name or model_id(args.model)
    adapters = adapter_args(args.adapter, name)

    from pg_edge.pipeline import load

    from pg_edge.server import make_server

    _few_malloc_arenas()

    pg = load(args.model, attention=args.attention, adapters=adapters, max_batch=args.max_batch)
    try:
        server = make_server(pg, args.host, args.port, model_id=name,
                             allow_remote_images=args.allow_remote_images, files_root=args.allow_files,
                             api_key=args.api_key, max_body_bytes=int(args.max_body_mb * 2**20),
                             max_tokens=args.max_tokens, queue_size=args.queue_size,
                             queue_timeout=args.queue_timeout, vae=args.vae, verbose=args.verbose,
                             pixel_budget=args.pixel_budget, allowed_hosts=args.allowed_host,
                             request_timeout=args.request_timeout, max_batch=args.max_batch)
    except OSError as err:
        raise PgEdgeError(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}") from None
    also = f" + adapters {', '.join(pg.adapters)}" if pg.adapters else ""
    print(f"pg-edge serve: {server.model_id}{also} on {server.url}, batches of up to {pg.max_batch} "
          "(Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        stop(server)
        return 0
    except Terminated:  # apps/cli/main.py turns it into "terminated by signal N", exit 128 + N
        stop(server)
        raise
    finally:
        server.server_close()
    return 0


def stop(server) -> None:
    """After a signal (later ones are ignored meanwhile, pg_edge.checkpoint.atomic.signals_raise): answer
    everyone, then wait for the model's worker to finish the step it is in (a generation stops
    at its next token; a long prefill cannot be cut): no request is left to start another."""
    print("pg-edge serve: stopping (answering waiting requests)", file=sys.stderr, flush=True)
    unanswered = server.stop()
    worker = server.pg._worker  # pg_edge.worker.ModelWorker: every model call runs there
    if worker.busy:
        print("pg-edge serve: waiting for the model to finish its current step", file=sys.stderr, flush=True)
        worker.settle(EXIT_WAIT_S)
    print("pg-edge serve: stopped" + (f" ({unanswered} requests were still running)" if unanswered else ""),
          file=sys.stderr, flush=True)
