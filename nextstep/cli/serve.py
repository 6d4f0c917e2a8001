"""`nextstep serve`: the OpenAI-compatible image API and the web page (needs `nextstep[serve]`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve an OpenAI-compatible image API and a web page",
                       description="Serve POST /v1/images/generations and /v1/images/edits (OpenAI's Images "
                                   "API), GET /health, and a web page at /. Concurrent requests with the same "
                                   "settings are batched into one model call. Needs: pip install 'nextstep[serve]'.")
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped shapes model)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health and the page")
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
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serving.api import Limits, create_app, with_body_limit
    except ImportError as e:
        raise ValueError(f"serving needs extra packages ({e.name} is missing): pip install 'nextstep[serve]'") from None
    from ..pipeline import NextStepPipeline
    from ..serving import Engine

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    if args.gather_ms < 0:
        raise ValueError(f"--gather-ms must be >= 0, got {args.gather_ms}")
    pipe = NextStepPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    engine = Engine(pipe, slots=args.slots, max_queue=args.max_queue, gather_s=args.gather_ms / 1000)
    limits = Limits(max_n=args.max_n, timeout_s=args.timeout)
    name = args.model.name if args.model else "nextstep-shapes"
    app = with_body_limit(create_app(engine, api_key=args.api_key, limits=limits, model_name=name), limits)
    print(f"serving {name} on http://{args.host}:{args.port}/ (API at /v1/images/...)")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0
