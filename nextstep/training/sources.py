"""Opening a training data source, the same way for both training loops.

A source is a `DataSource` (see `config.py`): the synthetic shapes world
(`kind = "shapes"`) or image files (`"files"`: a folder, a `.jsonl` manifest or
WebDataset shards). A missing or unusable one is a ConfigError naming its key.
"""

from __future__ import annotations

from pathlib import Path

from ..data import StreamDataset, open_dataset
from ..errors import ConfigError
from ..shapes.dataset import ShapesDataset
from .config import DataSource


def open_source(source: DataSource, seed: int, key: str, shuffle: bool = True, rank: int | None = None,
                world_size: int | None = None) -> StreamDataset:
    """The dataset of `source`; `seed` seeds the shapes world or the shuffle, `key` names it in errors.

    `rank` / `world_size` None: those of torch.distributed, if it is initialised (see StreamDataset).
    """
    if source.kind == "shapes":
        try:
            return ShapesDataset(size=source.size, seed=seed, edits=source.edits, dark_prob=source.dark_prob,
                                 rank=rank, world_size=world_size, plan_prob=source.plan_prob,
                                 raster_order=source.raster_order,
                                 **({"colour_prob": None} if source.benchmark_colours else {}))
        except ValueError as e:
            raise ConfigError(f"config key {key!r}: {e}") from None
    local = "://" not in source.path and "{" not in source.path
    if local and not Path(source.path).exists():
        raise ConfigError(f"config key {key!r}: {source.path} does not exist")
    try:
        return open_dataset(source.path, resolution=source.resolution, task=source.task, seed=seed,
                            shuffle=shuffle, rank=rank, world_size=world_size)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config key {key!r}: cannot open {source.path}: {e}") from None
