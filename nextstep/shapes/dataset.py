"""The seeded shapes-world samples and the endless dataset the small model trains on.

`make_sample(config, k)` is sample k of the world `config`: a captioned scene,
or with edits a (source, instruction, target) triplet; with probability
`plan_prob` it also carries the plan of its image (edits: of the target), the
thought the model learns to write before drawing (`plan`). It depends only on
(config, k), so any worker can make any sample and a resume is exact.
`ShapesDataset` streams these samples as model tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import islice

import numpy as np

from ..data.stream import Record, StreamDataset
from ..io.images import to_pixels
from .plan import plan_text
from .renderer import render
from .sampling import in_raster_order, pick, sample_edit, sample_scene
from .world import CATEGORIES, Scene, check_size


@dataclass(frozen=True)
class ShapesSample:
    """One sample of the world: a captioned scene, or an edit (source, instruction, target)."""

    index: int
    scene: Scene  # the image (the target, for an edit)
    caption: str | None = None
    category: str | None = None
    source: Scene | None = None
    instruction: str | None = None
    plan: str | None = None  # the plan of `scene`, for a sample drawn to carry one

    @property
    def is_edit(self) -> bool:
        return self.source is not None


@dataclass(frozen=True)
class ShapesConfig:
    """What `make_sample` draws: canvas size, seed, and the caption/edit mixture."""

    size: int = 64
    seed: int = 0
    edits: bool = False
    categories: tuple[str, ...] = CATEGORIES
    colour_prob: float | None = 0.5  # None: the benchmark's colour rule per category
    dark_prob: float = 0.2
    plan_prob: float = 0.0  # the share of samples that carry the plan of their image
    raster_order: bool = False  # two-object captions name first the object the image's tokens reach first

    def __post_init__(self) -> None:
        check_size(self.size)
        bad = [c for c in self.categories if c not in CATEGORIES]
        if bad or not self.categories:
            raise ValueError(f"categories must be a non-empty subset of {CATEGORIES}, got {self.categories!r}")
        for name in ("colour_prob", "dark_prob", "plan_prob"):
            p = getattr(self, name)
            if p is not None and not 0 <= p <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {p!r}")


def make_sample(config: ShapesConfig, index: int) -> ShapesSample:
    """Sample `index` of the world `config`: a pure function of (config, index)."""
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    rng = np.random.default_rng([config.seed, index])
    if config.edits:
        source, edit, target = sample_edit(rng, config.size, config.dark_prob)
        sample = ShapesSample(index, target, source=source, instruction=str(edit))
    else:
        category = pick(rng, config.categories)
        scene, caption = sample_scene(rng, config.size, category, config.colour_prob, config.dark_prob)
        if config.raster_order:  # draws nothing: the scenes are the same either way
            caption = in_raster_order(caption, scene)
        sample = ShapesSample(index, scene, str(caption), category)
    # Drawn last, so the scenes are the same whatever plan_prob is.
    if rng.random() < config.plan_prob:
        sample = replace(sample, plan=plan_text(sample.scene))
    return sample


class ShapesDataset(StreamDataset):
    """The endless seeded shapes stream. Worker-safe: sample k is `make_sample(config, k)`.

    Rank r of R owns global indices r, r+R, r+2R, ... (its slots 0, 1, 2, ...);
    its DataLoader workers take turns over the slots not yet consumed. Samples:
    {"key", "caption", "pixels", "labels", "category"} or, with edits,
    {"key", "instruction", "source", "target", "labels"}, and "plan" for a sample
    that carries one; pixels are (3, S, S) in [-1, 1].
    """

    UNIT = "shapes"

    def __init__(self, size: int = 64, seed: int = 0, edits: bool = False,
                 categories: Sequence[str] = CATEGORIES, colour_prob: float | None = 0.5, dark_prob: float = 0.2,
                 rank: int | None = None, world_size: int | None = None, plan_prob: float = 0.0,
                 raster_order: bool = False) -> None:
        super().__init__(seed=seed, shuffle=False, rank=rank, world_size=world_size)
        self.config = ShapesConfig(size, seed, edits, tuple(categories), colour_prob, dark_prob, plan_prob,
                                   raster_order)

    def _source_id(self) -> str:
        c = self.config
        # Options left at their defaults are not named, so a run made before they existed still resumes.
        extra = (f", plan_prob={c.plan_prob}" if c.plan_prob else "") + (", raster_order=True" if c.raster_order else "")
        return f"shapes(size={c.size}, edits={c.edits}, categories={list(c.categories)}, " \
               f"colour_prob={c.colour_prob}, dark_prob={c.dark_prob}{extra})"

    def _read(self, rank: int, world: int, wid: int, nw: int) -> Iterator[Record]:
        for slot in islice(self._todo(self.UNIT), wid, None, nw):
            k = rank + world * slot
            yield Record(self.UNIT, slot, f"{k:09d}", k)

    def _decode(self, record: Record) -> dict:
        s = make_sample(self.config, record.data)
        plan = {} if s.plan is None else {"plan": s.plan}
        if s.is_edit:
            return {"instruction": s.instruction, "source": to_pixels(render(s.source)),
                    "target": to_pixels(render(s.scene)),
                    "labels": {"source": s.source.labels(), "target": s.scene.labels()}, **plan}
        return {"caption": s.caption, "pixels": to_pixels(render(s.scene)), "labels": s.scene.labels(),
                "category": s.category, **plan}
