"""A real server for the serving tests: uvicorn on a free loopback port, in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from nextstep import NextStepPipeline
from nextstep.serving import Engine
from nextstep.serving.api import Limits, create_app
from nextstep.serving.metrics import Metrics

API_KEY = "test-key"
STEPS = 4  # flow steps per token in the tests: enough to make real images, fast on the CPU


@dataclass
class Served:
    url: str
    engine: Engine
    port: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"no healthy server at {url} after {seconds:g} s")


@contextmanager
def serve(pipe: NextStepPipeline | None = None, api_key: str | list[str] | None = API_KEY, slots: int = 4,
          max_queue: int = 32, gather_s: float = 0.05, limits: Limits | None = None,
          allowed_hosts: Iterable[str] = (), cors_origins: Iterable[str] = ()) -> Iterator[Served]:
    import uvicorn

    pipe = pipe or NextStepPipeline.from_pretrained()
    metrics = Metrics()
    engine = Engine(pipe, slots=slots, max_queue=max_queue, gather_s=gather_s, on_batch=metrics.on_batch)
    limits = limits or Limits(max_body_bytes=256 * 1024)
    keys = [] if api_key is None else [api_key] if isinstance(api_key, str) else api_key
    app = create_app(engine, api_keys=keys, limits=limits, host="127.0.0.1", allowed_hosts=allowed_hosts,
                     cors_origins=cors_origins, metrics=metrics)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, 10)
    try:
        yield Served(url, engine, port)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.close()
