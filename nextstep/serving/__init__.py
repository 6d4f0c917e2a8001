"""Serving: an OpenAI-compatible image API with request batching, and a web page (`nextstep serve`)."""

from .engine import Engine, QueueFull

__all__ = ["Engine", "QueueFull"]
