"""Request batching for the server: many callers, one model call at a time.

Every image a caller asks for becomes one job: (prompt, seed, settings, source
image). Jobs wait in a bounded queue; a worker thread takes the oldest job,
waits a short gathering window for more jobs it can share a call with (same
settings, same kind, same prompt length: no job is padded for another), and
runs them as one batched generation.

Every model call has exactly `slots` images: empty slots are filled with
copies of the first job, whose results are dropped. With the shapes fixed,
each row's arithmetic does not depend on the other rows (checked in the
tests), so an image depends only on its own prompt, settings and seed, never
on what shared its call or where in the batch it sat: it is the image
`pipe(...)` and the CLI give. Image k of a request with seed s is the image of
seed s + k. The price is that a lone request pays for a full call; `slots`
trades latency when idle against throughput under load.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from PIL import Image

from ..pipeline import NextStepPipeline
from ..sampling.requests import GenerationRequest, merge_requests
from ..settings import SEED_MODULUS, GenerationSettings
from ..text import image_block, image_prefix

logger = logging.getLogger("nextstep.serving")


class QueueFull(Exception):
    """The queue holds `max_queue` images already; the caller should retry later."""


@dataclass(eq=False)
class Job:
    prompt: str  # an edit's with its <image> slot
    seed: int
    settings: GenerationSettings
    image: Image.Image | None
    key: tuple  # what jobs must share to run in one model call: settings, edit or not, prompt length
    future: Future = field(default_factory=Future)


class Engine:
    """A worker thread that runs queued jobs in batches of `slots` images."""

    def __init__(self, pipe: NextStepPipeline, slots: int = 16, max_queue: int = 128, gather_s: float = 0.05,
                 max_prompt_tokens: int = 64) -> None:
        if slots < 1 or max_queue < slots:
            raise ValueError(f"need 1 <= slots <= max_queue, got slots={slots}, max_queue={max_queue}")
        self.pipe = pipe
        self.slots, self.max_queue, self.gather_s = slots, max_queue, gather_s
        self.max_prompt_tokens = max_prompt_tokens
        self.batches = 0  # model calls made
        self.images = 0  # images delivered
        self._queue: list[Job] = []
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="nextstep-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers
    def submit(self, prompt: str, seeds: list[int], settings: GenerationSettings,
               image: Image.Image | None = None) -> list[Future]:
        """Queue one job per seed; returns their futures (each resolves to a PIL image). With
        `image` it is an edit. Raises QueueFull when they do not fit, ValueError for bad input."""
        if image is not None:
            prompt = self.pipe.edit_prompt(prompt, settings)
        self.pipe.check_inputs(prompt, image, 1, settings)
        key = (settings, image is not None, self.pipe.prompt_length(prompt, image, settings))
        jobs = [Job(prompt, s % SEED_MODULUS, settings, image, key) for s in seeds]
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._queue) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._queue)} images are queued (at most {self.max_queue})")
            self._queue.extend(jobs)
            self._cv.notify_all()
        return [j.future for j in jobs]

    def queued(self) -> int:
        with self._cv:
            return len(self._queue)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for job in self._queue:
                job.future.cancel()
            self._queue.clear()
            self._cv.notify_all()
        self._thread.join(timeout=60)

    def prompt_tokens(self, text: str) -> int:
        return len(self.pipe.tokenizer.encode(text))

    # ------------------------------------------------------------------ the worker
    def _take(self) -> list[Job]:
        """The next batch: the oldest job and up to `slots - 1` queued jobs with its settings,
        after waiting up to `gather_s` for them to arrive."""
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if self._closed:
                return []
            key = self._queue[0].key
            deadline = time.monotonic() + self.gather_s
            while (sum(j.key == key for j in self._queue) < self.slots
                   and (left := deadline - time.monotonic()) > 0):
                self._cv.wait(left)
            batch = [j for j in self._queue if j.key == key][: self.slots]
            taken = set(map(id, batch))
            self._queue = [j for j in self._queue if id(j) not in taken]
        # A caller that gave up (timeout) cancelled its future: skip it.
        return [j for j in batch if j.future.set_running_or_notify_cancel()]

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if not jobs:
                with self._cv:
                    if self._closed:
                        return
                continue
            requests = {}
            for j in jobs:  # a job that cannot be prepared fails alone
                try:
                    requests[j] = self._prepare(j)
                except Exception as e:
                    j.future.set_exception(e)
            if not requests:
                continue
            try:
                images = self._run(list(requests.values()))
            except Exception as e:  # the callers get the error; the worker lives on
                logger.exception("a batch of %d images failed", len(requests))
                for j in requests:
                    j.future.set_exception(e)
                continue
            for j, im in zip(requests, images):
                j.future.set_result(im)
            self.batches += 1
            self.images += len(requests)

    def longest_prompt(self, hw: tuple[int, int], edit: bool) -> int:
        """Tokens in the longest prompt row a request of this size may have."""
        f = self.pipe.down_factor
        h, w = hw[0] // f, hw[1] // f
        enc = self.pipe.tokenizer.encode
        return self.max_prompt_tokens + len(enc(image_prefix(h, w))) + (len(enc(image_block(h, w))) if edit else 0)

    def _prepare(self, job: Job) -> GenerationRequest:
        return self.pipe.prepare(job.prompt, job.image, 1, job.seed, job.settings)

    def _run(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        n = len(requests)
        requests = requests + [requests[0]] * (self.slots - n)  # fillers keep every call the same shape
        batch = merge_requests(requests)
        return self.pipe.decode_tokens(self.pipe.sample_tokens(batch), batch.grid)[:n]
