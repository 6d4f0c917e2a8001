"""The model shipped inside the package: present, small, loadable with no argument, and drawing shapes."""

from __future__ import annotations

import numpy as np
import pytest

from nextstep import NextStepPipeline
from nextstep.pipeline import SHIPPED_MODEL
from nextstep.shapes.detector import detect

MAX_BYTES = 56 * 2**20  # in the wheel: v23 (12 decoder layers, float32) is 46 MiB


@pytest.fixture(scope="module")
def pipe() -> NextStepPipeline:
    return NextStepPipeline.from_pretrained()


def test_shipped_model_is_complete_and_small():
    files = {p.relative_to(SHIPPED_MODEL).as_posix() for p in SHIPPED_MODEL.rglob("*") if p.is_file()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_defaults.json", "MODEL_CARD.md",
                 "vae/config.json", "vae/model.safetensors"):
        assert name in files, name
    size = sum(p.stat().st_size for p in SHIPPED_MODEL.rglob("*") if p.is_file())
    assert size <= MAX_BYTES, f"{size / 2**20:.1f} MiB"


def test_loads_with_no_argument_and_uses_its_defaults(pipe):
    assert pipe.default_size == (64, 64)
    assert pipe.settings.use_norm is True  # its VAE layer-normalises every token
    images = pipe("a red circle", num_images_per_prompt=2, generator=0).images
    assert [im.size for im in images] == [(64, 64), (64, 64)]


def test_draws_objects_of_the_shapes_world(pipe):
    """Not a quality bar (that is `nextstep eval shapes`): the images hold palette-coloured shapes."""
    images = pipe(["a red circle", "a blue square", "a green triangle", "a yellow circle"],
                  num_images_per_prompt=2, generator=1).images
    found = [obj for im in images for obj in detect(np.asarray(im)).objects]
    named = [o for o in found if o.colour is not None and o.shape is not None]
    assert len(named) >= 4, f"only {len(named)} recognisable objects in {len(images)} images"
