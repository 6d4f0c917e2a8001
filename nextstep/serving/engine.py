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

Prompts are plain text (a user cannot spell special tokens or place the
source image). A caller that gives up cancels its futures: cancelled jobs take
no slot and cause no model work. When a shared call fails, each of its jobs is
run alone, so only a job that fails by itself gets the error (with its type:
a ValueError stays a ValueError, for the API to answer 400).

A job that thinks (`settings.think`, or `think_edits` for an edit; self-CoT, docs/self-cot.md)
runs twice: first its thought is written, batched with jobs of the same settings
and thought-prompt length; then it goes back to the front of the queue with the
key of its image prompt (prompt + thought), so it only shares an image call with
jobs whose prompt rows have that same length. Its image carries the thought in
`image.info["thought"]`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
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


class Draining(QueueFull):
    """The engine is draining (shutting down) and takes no new jobs. A kind of QueueFull, so the
    caller answers as for a full queue: retry later (elsewhere)."""


@dataclass(eq=False)
class Job:
    prompt: str  # plain text
    seed: int
    settings: GenerationSettings
    image: Image.Image | None
    key: tuple  # what jobs must share to run in one model call: settings, edit or not, prompt length
    future: Future = field(default_factory=Future)
    thought: str | None = None  # written (think=True) before the image is drawn

    @property
    def thinking(self) -> bool:
        """Whether the job's next model call writes its thought."""
        return self.settings.thinks(edit=self.image is not None) and self.thought is None


class Engine:
    """A worker thread that runs queued jobs in batches of `slots` images.

    `on_batch(images, seconds)`, if given, is called after each successful model call with the
    number of real jobs' images it made (not fillers) and the seconds it took, for metrics."""

    def __init__(self, pipe: NextStepPipeline, slots: int = 16, max_queue: int = 128, gather_s: float = 0.05,
                 max_prompt_tokens: int = 64, on_batch: Callable[[int, float], None] | None = None) -> None:
        if slots < 1 or max_queue < slots:
            raise ValueError(f"need 1 <= slots <= max_queue, got slots={slots}, max_queue={max_queue}")
        self.pipe = pipe
        self.slots, self.max_queue, self.gather_s = slots, max_queue, gather_s
        self.max_prompt_tokens = max_prompt_tokens
        self.on_batch = on_batch
        self.batches = 0  # model calls made
        self.images = 0  # images delivered
        self._queue: list[Job] = []
        self._cv = threading.Condition()
        self._closed = False
        self._draining = False
        self._busy = False  # the worker holds taken jobs whose futures are not all resolved yet
        self._thread = threading.Thread(target=self._loop, name="nextstep-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers
    def submit(self, prompt: str, seeds: list[int], settings: GenerationSettings,
               image: Image.Image | None = None) -> list[Future]:
        """Queue one job per seed; returns their futures (each resolves to a PIL image). With
        `image` it is an edit. The prompt is plain text. Raises QueueFull when they do not fit
        (Draining once `drain` has begun), ValueError for bad input."""
        self.pipe.check_inputs(prompt, image, 1, settings, plain=True)
        if settings.thinks(edit=image is not None):  # first the thought, after the prompt's row up to THOUGHT_OPEN
            row = self.pipe.thought_prompt(prompt, image, settings)
            key = ("thought", settings, image is not None, len(self.pipe.tokenizer.encode_row(row)))
        else:
            key = (settings, image is not None, self.pipe.prompt_length(prompt, image, settings, plain=True))
        jobs = [Job(prompt, s % SEED_MODULUS, settings, image, key) for s in seeds]
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if self._draining:
                raise Draining("the server is shutting down and takes no new requests")
            self._drop_cancelled()  # a gone caller's jobs hold no place in the queue
            if len(self._queue) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._queue)} images are queued (at most {self.max_queue})")
            self._queue.extend(jobs)
            self._cv.notify_all()
        return [j.future for j in jobs]

    def queued(self) -> int:
        with self._cv:
            self._drop_cancelled()
            return len(self._queue)

    def drain(self, timeout_s: float) -> bool:
        """Stop taking new jobs (submit raises Draining), let every queued and running job finish,
        then close. Returns True if all finished within `timeout_s`; if not, the engine is left
        draining (still working, taking nothing new) for the caller to wait again or `close()`."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            self._draining = True
            self._cv.notify_all()
            while True:
                self._drop_cancelled()
                if not self._queue and not self._busy:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        self.close()
        return True

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for job in self._queue:
                job.future.cancel()
            self._queue.clear()
            self._cv.notify_all()
        self._thread.join(timeout=60)

    def prompt_tokens(self, text: str) -> int:
        """Tokens in `text` read as a prompt is read: plain text."""
        return len(self.pipe.tokenizer.encode(text, plain=True))

    # ------------------------------------------------------------------ the worker
    def _take(self) -> list[Job]:
        """The next batch: the oldest job and up to `slots - 1` queued jobs with its settings,
        after waiting up to `gather_s` for them to arrive."""
        with self._cv:
            self._busy = False  # the previous batch's futures are all resolved
            self._cv.notify_all()  # a drain may be waiting for that
            while not self._closed:
                self._drop_cancelled()
                if self._queue:
                    break
                self._cv.wait()
            if self._closed:
                return []
            key = self._queue[0].key
            deadline = time.monotonic() + self.gather_s
            while (sum(j.key == key for j in self._queue) < self.slots
                   and (left := deadline - time.monotonic()) > 0):
                self._cv.wait(left)
            self._drop_cancelled()
            batch = [j for j in self._queue if j.key == key][: self.slots]
            taken = set(map(id, batch))
            self._queue = [j for j in self._queue if id(j) not in taken]
            self._busy = bool(batch)
        # A caller that gave up (timeout, disconnect) may cancel until here: skip its jobs. A job
        # about to write its thought stays cancellable until its image call.
        return [j for j in batch if (not j.future.cancelled() if j.thinking
                                     else j.future.set_running_or_notify_cancel())]

    def _drop_cancelled(self) -> None:
        """Forget queued jobs whose caller cancelled them (hold the lock)."""
        self._queue = [j for j in self._queue if not j.future.cancelled()]

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if not jobs:  # closed, or every taken job was cancelled: no model work
                with self._cv:
                    if self._closed:
                        return
                continue
            if jobs[0].thinking:  # the batch shares one key: all write their thoughts
                self._think(jobs)
                continue
            requests = {}
            for j in jobs:  # a job that cannot be prepared fails alone
                try:
                    requests[j] = self._prepare(j)
                except Exception as e:
                    j.future.set_exception(e)
            if requests:
                self._run_jobs(requests)

    def _run_jobs(self, requests: dict[Job, GenerationRequest]) -> None:
        """Run jobs in one model call and resolve their futures. If the call fails, each job is run
        alone, so that one bad job does not fail the others; a lone failure is the job's own."""
        start = time.monotonic()
        try:
            images = self._run(list(requests.values()))
        except Exception as e:  # the worker lives on whatever the model raises
            if len(requests) > 1:
                logger.warning("a call of %d images failed (%r); running each alone", len(requests), e)
                for j, r in requests.items():
                    self._run_jobs({j: r})
                return
            logger.exception("an image failed")
            next(iter(requests)).future.set_exception(e)
            return
        for j, im in zip(requests, images):
            if j.thought is not None:
                im.info["thought"] = j.thought
            j.future.set_result(im)
        self.batches += 1
        self.images += len(requests)
        if self.on_batch is not None:
            try:
                self.on_batch(len(requests), time.monotonic() - start)
            except Exception:  # metrics must not stop the server
                logger.exception("on_batch failed")

    def _think(self, jobs: list[Job]) -> None:
        """Write the jobs' thoughts in one model call (padded to `slots` rows, as image calls are),
        then queue each at the front again, keyed by its image prompt. As in `_run_jobs`, a failed
        call is retried job by job, and a job that fails alone gets the error."""
        try:
            thoughts = self._write_thoughts(jobs)
        except Exception as e:
            if len(jobs) > 1:
                logger.warning("thoughts of %d jobs failed (%r); writing each alone", len(jobs), e)
                for j in jobs:
                    self._think([j])
                return
            logger.exception("a thought failed")
            if jobs[0].future.set_running_or_notify_cancel():
                jobs[0].future.set_exception(e)
            return
        for j, thought in zip(jobs, thoughts):
            j.thought = thought
            j.key = (j.settings, j.image is not None,
                     self.pipe.prompt_length(j.prompt, j.image, j.settings, plain=True, thought=thought))
        with self._cv:
            if self._closed:  # closed while thinking: nobody will draw these images
                for j in jobs:
                    j.future.cancel()
                return
            self._queue[:0] = jobs  # ahead of younger jobs; cancelled ones are dropped by the next take
            self._cv.notify_all()

    def _write_thoughts(self, jobs: list[Job]) -> list[str]:
        pipe, s = self.pipe, jobs[0].settings
        fill = self.slots - len(jobs)
        rows = [pipe.thought_prompt(j.prompt, j.image, s) for j in jobs]
        ids = pipe.write(rows + rows[:1] * fill, [j.image for j in jobs] + [jobs[0].image] * fill,
                         [j.seed for j in jobs] + [jobs[0].seed] * fill, s, pipe.special_ids, self.slots)
        return [pipe.thought_text(t) for t in ids[:len(jobs)]]

    def longest_prompt(self, hw: tuple[int, int], edit: bool) -> int:
        """Tokens in the longest prompt row a request of this size may have."""
        f = self.pipe.down_factor
        h, w = hw[0] // f, hw[1] // f
        enc = self.pipe.tokenizer.encode
        return self.max_prompt_tokens + len(enc(image_prefix(h, w))) + (len(enc(image_block(h, w))) if edit else 0)

    def _prepare(self, job: Job) -> GenerationRequest:
        thoughts = None if job.thought is None else [job.thought]
        return self.pipe.prepare(job.prompt, job.image, 1, job.seed, job.settings, plain=True, thoughts=thoughts)

    def _run(self, requests: list[GenerationRequest]) -> list[Image.Image]:
        n = len(requests)
        requests = requests + [requests[0]] * (self.slots - n)  # fillers keep every call the same shape
        batch = merge_requests(requests)
        return self.pipe.decode_tokens(self.pipe.sample_tokens(batch), batch.grid)[:n]
