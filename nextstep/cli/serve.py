"""`nextstep serve`: the OpenAI-compatible image API and the web page (needs `nextstep[serve]`)."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

from .common import add_compile_arg, add_hub_args, add_quantize_arg, hub_kwargs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve an OpenAI-compatible image API and a web page",
                       description="Serve POST /v1/images/generations and /v1/images/edits (OpenAI's Images "
                                   "API), GET /health and /metrics, and a web page at /. Concurrent requests with "
                                   "the same settings are batched into one model call. Requests whose Host is not "
                                   "this server, and browsers' requests from other origins, are refused. On SIGTERM "
                                   "the server stops accepting, finishes what it accepted and exits. Needs: pip "
                                   "install 'nextstep[serve]'.")
    p.add_argument("--model", default=None, metavar="DIR_OR_HUB_ID",
                   help="model folder or Hugging Face Hub id such as org/name (default: the shipped shapes model)")
    add_hub_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a further name the Host header may give (repeatable; '*': any), e.g. the server's DNS "
                        "name; the bound host is always allowed, and localhost with 127.0.0.1")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let browser pages from ORIGIN (e.g. https://app.example.com; '*': any) call the API "
                        "(repeatable); other origins are refused")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health and the page "
                        "(repeatable; also read from $NEXTSTEP_API_KEY and --api-key-file)")
    p.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                   help="API keys, one a line (blank lines and # comments ignored)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds to finish the accepted requests before exiting (default 30)")
    p.add_argument("--slots", type=int, default=16, help="images per model call (default 16)")
    p.add_argument("--max-queue", type=int, default=128,
                   help="images that may wait; beyond, requests get 503 (default 128)")
    p.add_argument("--gather-ms", type=float, default=50.0,
                   help="how long a call waits for more requests to share it (default 50 ms)")
    p.add_argument("--max-n", type=int, default=8, help="most images per request (default 8)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may wait (default 120)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or bf16-mixed (default: the model's choice for CPUs, else the device's)")
    add_quantize_arg(p)
    add_compile_arg(p, "default: on with CUDA (a server pays the warm-up once), off on the CPU")
    p.set_defaults(run=run)


def api_keys(args: argparse.Namespace) -> list[str]:
    """Every key the server accepts: --api-key, $NEXTSTEP_API_KEY and the lines of --api-key-file."""
    keys = list(args.api_key)
    if os.environ.get("NEXTSTEP_API_KEY", "").strip():
        keys.append(os.environ["NEXTSTEP_API_KEY"].strip())
    if args.api_key_file is not None:
        if not args.api_key_file.is_file():
            raise FileNotFoundError(f"--api-key-file {args.api_key_file} does not exist")
        lines = [line.strip() for line in args.api_key_file.read_text().splitlines()]
        from_file = [line for line in lines if line and not line.startswith("#")]
        if not from_file:  # an empty file must not quietly leave the server open
            raise ValueError(f"--api-key-file {args.api_key_file} holds no key")
        keys += from_file
    if any(not k or any(c.isspace() for c in k) for k in keys):
        raise ValueError("an API key may not be empty or hold spaces")
    return keys


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serving.api import Limits, Metrics, create_app
    except ImportError as e:
        raise ValueError(f"serving needs extra packages ({e.name} is missing): pip install 'nextstep[serve]'") from None
    from ..pipeline import NextStepPipeline
    from ..serving import Engine

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    if args.gather_ms < 0:
        raise ValueError(f"--gather-ms must be >= 0, got {args.gather_ms}")
    if args.drain_timeout < 0:
        raise ValueError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    for origin in args.cors_origin:
        if origin != "*" and (not origin.startswith(("http://", "https://")) or origin.rstrip("/") != origin):
            raise ValueError(f"--cors-origin {origin!r}: give scheme://host[:port], without a path, or '*'")
    keys = api_keys(args)
    pipe = NextStepPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                                            compile=args.compile, **hub_kwargs(args))
    metrics = Metrics()
    engine = Engine(pipe, slots=args.slots, max_queue=args.max_queue, gather_s=args.gather_ms / 1000,
                    on_batch=metrics.on_batch)
    limits = Limits(max_n=args.max_n, timeout_s=args.timeout)
    name = Path(args.model).name if args.model else "nextstep-shapes"
    app = create_app(engine, api_keys=keys, limits=limits, model_name=name, host=args.host,
                     allowed_hosts=args.allowed_host, cors_origins=args.cors_origin, metrics=metrics)
    # On SIGTERM uvicorn closes its sockets and waits (up to the drain timeout) for the requests
    # it accepted to be answered.
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=args.drain_timeout))
    print(f"serving {name} on http://{args.host}:{args.port}/ (API at /v1/images/...)", flush=True)
    # uvicorn raises the signal it handled again once it has stopped; this no-op handler takes it,
    # so a SIGTERM ends in the clean exit below rather than in death by signal.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        # Jobs still queued belong to requests uvicorn gave up on; let the running call finish.
        drained = engine.drain(args.drain_timeout)
        engine.close()
    if not drained:
        print(f"the engine did not finish within --drain-timeout {args.drain_timeout:g} s", flush=True)
        return 1
    print("stopped: every accepted request was answered", flush=True)
    return 0
