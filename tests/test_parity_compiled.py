"""Both parity suites' end-to-end cases with the token loop compiled (`NextStepPipeline(compile=True)`).

The compiled loop must give the official images as the eager one does, within the same tolerances.
Here it compiles with the `aot_eager` backend: Dynamo's capture of the decode step and the whole
flow integration as single graphs (fullgraph=True, so a graph break fails), with AOTAutograd's
functionalization of the in-place cache writes. Inductor's C++ build would take minutes on 2 cores;
CUDA graphs need a GPU (benchmarks/gpu.py).

Every end-to-end case of both suites runs (about 50 s on 2 quiet cores: each case captures its own
shapes once).
"""

from __future__ import annotations

import pytest
import torch

from nextstep import NextStepPipeline
from nextstep.sampling.compiled import CompiledLoop

from .test_parity import test_end_to_end as test_end_to_end_10  # noqa: F401  (collected here, compiled pipe)
from .test_parity_11 import test_end_to_end as test_end_to_end_11  # noqa: F401


@pytest.fixture(scope="module", autouse=True)
def enough_recompiles():
    # Every case has its own shapes, and each compiles once; Dynamo's default limit of 8 per function
    # would silently run the later cases eagerly.
    with torch._dynamo.config.patch(recompile_limit=64):
        torch._dynamo.reset()
        yield
        torch._dynamo.reset()


@pytest.fixture(scope="module")
def compiled_pipes(ref10, ref11) -> dict[str, NextStepPipeline]:
    pipes = {}
    for name, ref in (("1.0", ref10), ("1.1", ref11)):
        pipe = NextStepPipeline.from_pretrained(ref / "model", ref / "vae", device="cpu", dtype=torch.float32)
        pipe.compiled = CompiledLoop(torch.device("cpu"), backend="aot_eager")
        pipes[name] = pipe
    return pipes


@pytest.fixture
def pipe(request, compiled_pipes) -> NextStepPipeline:
    """The compiled pipe of the suite the test function comes from."""
    return compiled_pipes["1.1" if request.function.__module__.endswith("_11") else "1.0"]


def test_the_compiled_loop_ran(compiled_pipes):
    """The cases above went through compiled graphs (not an eager fallback)."""
    for name, pipe in compiled_pipes.items():
        shapes = pipe.compiled.shapes
        assert shapes["decoder"] and shapes["flow head"], name
        assert all(s != ("eager from here",) for s in shapes["decoder"] + shapes["flow head"]), name


def test_flow_head_graphs_are_bounded_per_batch(ref10, monkeypatch):
    """Each (batch, guidance groups) the flow head meets is a graph of its own and counts against
    `MAX_SHAPES`; past the bound a new batch runs eagerly (recorded once) with the same tokens."""
    import nextstep.sampling.compiled as compiled

    monkeypatch.setattr(compiled, "MAX_SHAPES", 2)
    pipe = NextStepPipeline.from_pretrained(ref10 / "model", ref10 / "vae", device="cpu", dtype=torch.float32)

    def tokens(batch: int) -> torch.Tensor:
        request = pipe.official_request("a red fox", num_images_per_caption=batch, seed=3, hw=(32, 32), cfg=3.0,
                                        num_sampling_steps=4)
        return pipe.sample_tokens(request)

    eager = {batch: tokens(batch) for batch in (1, 2, 3)}
    pipe.compiled = compiled.CompiledLoop(torch.device("cpu"), backend="eager")
    for batch in (1, 2, 3):
        # (float rounding only: the compiled loop attends over a cache of a bucketed length)
        torch.testing.assert_close(tokens(batch), eager[batch], atol=1e-4, rtol=0, msg=f"batch {batch}")
    head = pipe.compiled.shapes["flow head"]
    assert [shape[-2:] for shape in head[:2]] == [(1, 2), (2, 2)], head
    assert head[2:] == [("eager from here",)], head
