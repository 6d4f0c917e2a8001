"""The server's Prometheus metrics (`GET /metrics`)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)


class Metrics:
    """The server's Prometheus metrics, in a registry of their own: two apps in one process (the
    tests) must not share counters. Pass `on_batch` to the Engine so model calls are counted."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("nextstep_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("nextstep_request_seconds", "seconds to answer an image request, by route",
                                 ["route"], registry=r, buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.in_progress = Gauge("nextstep_requests_in_progress", "image requests being answered", registry=r)
        self.images = Counter("nextstep_images", "images generated (a call's filler slots not counted)", registry=r)
        self.batch_size = Histogram("nextstep_batch_images", "images per model call", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.batch_seconds = Histogram("nextstep_batch_seconds", "seconds per model call", registry=r,
                                       buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.queued = Gauge("nextstep_queued_images", "images waiting for a model call", registry=r)

    def on_batch(self, images: int, seconds: float) -> None:
        """The Engine's hook, called from its worker thread after each model call."""
        self.images.inc(images)
        self.batch_size.observe(images)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
