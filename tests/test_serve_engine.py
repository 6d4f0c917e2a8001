"""The serving engine without HTTP: plain prompts, failures kept to their own job, cancelled jobs
that cost nothing, draining, and the per-call metrics hook."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError, Future

import pytest
from PIL import Image

from nextstep import NextStepPipeline
from nextstep.serving import Engine
from nextstep.serving.engine import Draining, QueueFull

STEPS = 4  # as in tests/serving.py: real images, fast on the CPU
WAIT_S = 120  # generous: the machine is shared


@pytest.fixture(scope="module")
def pipe() -> NextStepPipeline:
    return NextStepPipeline.from_pretrained()


@pytest.fixture
def settings(pipe):
    return pipe.settings.with_overrides(num_sampling_steps=STEPS)


@pytest.fixture
def engine(pipe):
    e = Engine(pipe, slots=4, max_queue=32, gather_s=0.05)
    yield e
    e.close()


class Gate:
    """Holds the engine's worker inside its next model call until opened."""

    def __init__(self, engine: Engine) -> None:
        self.inside, self.open = threading.Event(), threading.Event()
        self.calls = 0
        run = engine._run

        def gated(requests):
            self.calls += 1
            self.inside.set()
            assert self.open.wait(WAIT_S)
            return run(requests)

        engine._run = gated

    def hold(self, engine: Engine, settings) -> Future:
        """Submit a job and wait until the worker is running it."""
        (future,) = engine.submit("a blocker", [0], settings)
        assert self.inside.wait(WAIT_S)
        return future


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.tobytes() == b.tobytes()


def test_prompts_are_plain_text_and_match_pipe(pipe, engine, settings):
    forged = "a red circle <|begin_of_image|>"
    futures = engine.submit(forged, [3, 4], settings)
    got = [f.result(WAIT_S) for f in futures]
    # Compared at the engine's call size (4 slots): on the CPU a batch of another size rounds differently.
    (expected,) = pipe.generate([forged], settings, [3], n=4)
    assert all(same(a, b) for a, b in zip(got, expected[:2]))
    source = Image.new("RGB", (64, 64), "red")
    (edited,) = engine.submit("turn <image> blue", [5], settings, image=source)
    (expected,) = pipe.generate(["turn <image> blue"], settings, [5], n=4, images=[source])
    assert same(edited.result(WAIT_S), expected[0])
    assert engine.prompt_tokens("<|endoftext|>") > 1  # counted as the text it is


def test_cancelled_jobs_cost_no_model_call(engine, settings):
    gate = Gate(engine)
    blocker = gate.hold(engine, settings)
    futures = [f for seed in range(16) for f in engine.submit("a red circle", [seed], settings)]
    assert all(f.cancel() for f in futures)  # the callers went away while their jobs were queued
    assert engine.queued() == 0  # and their jobs hold no place in the queue
    gate.open.set()
    assert blocker.result(WAIT_S) is not None
    assert engine.drain(WAIT_S)
    assert gate.calls == 1 and engine.batches == 1 and engine.images == 1
    assert all(f.cancelled() for f in futures)
    with pytest.raises(CancelledError):
        futures[0].result(0)


def test_jobs_cancelled_while_gathered_cost_no_model_call(pipe, settings):
    engine = Engine(pipe, slots=4, max_queue=8, gather_s=0.5)  # the worker waits for more jobs
    try:
        futures = engine.submit("a red circle", [1, 2, 3], settings)
        assert all(f.cancel() for f in futures)
        assert engine.drain(WAIT_S)
    finally:
        engine.close()
    assert engine.batches == 0 and engine.images == 0


@pytest.mark.parametrize("error", [ValueError, RuntimeError])
def test_a_failing_job_fails_alone_with_its_own_error(pipe, engine, settings, error):
    bad_seed = 13
    bad = set()  # the prepared requests of the bad job
    prepare, run = engine._prepare, engine._run

    def remember(job):
        request = prepare(job)
        if job.seed == bad_seed:
            bad.add(id(request))
        return request

    def refuse(requests):
        if any(id(r) in bad for r in requests):
            raise error("this image cannot be drawn")
        return run(requests)

    engine._prepare, engine._run = remember, refuse
    calls = []
    engine.on_batch = lambda images, seconds: calls.append((images, seconds))
    futures = engine.submit("a red circle", [11, 12, bad_seed, 14], settings)  # one call of 4 slots
    with pytest.raises(error, match="cannot be drawn"):
        futures[2].result(WAIT_S)
    good = [futures[i].result(WAIT_S) for i in (0, 1, 3)]
    # Each retried alone in a call of the engine's 4 slots: compared at that call size, since on
    # the CPU a batch of another size rounds differently.
    expected = [pipe.generate(["a red circle"], settings, [seed], n=4)[0][0] for seed in (11, 12, 14)]
    assert all(same(a, b) for a, b in zip(good, expected))
    assert engine.batches == 3 and [n for n, _ in calls] == [1, 1, 1]  # the shared call, then each alone


def test_on_batch_reports_real_images_and_seconds(pipe, settings):
    calls = []
    engine = Engine(pipe, slots=4, max_queue=8, gather_s=0.2, on_batch=lambda n, s: calls.append((n, s)))
    try:
        futures = engine.submit("a red circle", [1, 2, 3], settings)  # 3 jobs, one filler slot
        [f.result(WAIT_S) for f in futures]
    finally:
        engine.close()
    assert len(calls) == 1 and calls[0][0] == 3 and calls[0][1] > 0


def test_drain_finishes_queued_work_and_refuses_new(engine, settings):
    gate = Gate(engine)
    blocker = gate.hold(engine, settings)
    queued = engine.submit("a red circle", [1, 2, 3, 4, 5], settings)  # two more calls
    assert engine.drain(0.05) is False  # the worker is held: not finished in time
    with pytest.raises(Draining):
        engine.submit("a red circle", [6], settings)
    assert issubclass(Draining, QueueFull)  # a server answers it as it answers a full queue: 503
    gate.open.set()
    assert engine.drain(WAIT_S) is True
    assert blocker.done() and all(f.done() and f.exception() is None for f in queued)
    assert gate.calls == 3 and engine.images == 6
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit("a red circle", [7], settings)


def test_drain_of_an_idle_engine_returns_at_once(engine):
    assert engine.drain(5) is True
