"""Image-caption pairs and editing triplets from a folder or a JSONL manifest.

Both are lists of items known up front, so an epoch is a shuffled order of all
items (seed, epoch), dealt to ranks and then workers (see `stream`). Items are
read and decoded in the workers; a bad item is skipped, counted and logged.

Folder: every file under `root` (recursively) is grouped with the others of its
key (`records.split_file_name`): `cat.jpg` + `cat.txt`, or `cat.jpg` +
`cat.json` {"caption": ...}; for edits `x.source.png` + `x.target.png` + `x.txt`.

JSONL: one JSON object per line. t2i: {"file" (or "image"/"path"): image path,
"caption" (or "text"/"prompt"): str, optional "plan": str, a thought the model learns to write
between caption and image (docs/self-cot.md)}; edit: {"source": path, "target": path,
"instruction": str}. Relative paths are relative to the manifest's folder; other
keys (e.g. "labels") are ignored. The manifest is indexed by byte offsets, so a
manifest of millions of lines costs 8 bytes a line in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from .records import check_task, decode_sample, roles, split_file_name
from .stream import DataError, Record, SkipSample, StreamDataset, epoch_order

ITEMS = "items"  # the one unit of an item list: slot j = this rank's j-th item of the epoch


class _ItemDataset(StreamDataset):
    """An epoch over `self._count()` items listed by `self._index(path)`, item i read by
    `self._item(i)` -> role fields."""

    def __init__(self, path: str | os.PathLike, resolution: int = 256, task: str = "t2i", seed: int = 0,
                 shuffle: bool = True, rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__(seed=seed, shuffle=shuffle, shuffle_buffer=0, rank=rank, world_size=world_size)
        self.task = check_task(task)
        self.resolution = resolution
        self._index(Path(path))

    def _index(self, path: Path) -> None:
        raise NotImplementedError

    def _count(self) -> int:
        raise NotImplementedError

    def _item(self, i: int) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    def _read(self, rank: int, world: int, wid: int, nw: int) -> Iterator[Record]:
        items = epoch_order(self._count(), self.seed, self.epoch, self.shuffle)[rank::world]
        for slot in islice(self._todo(ITEMS, len(items)), wid, None, nw):
            item = int(items[slot])
            yield Record(ITEMS, slot, str(item), item)

    def _decode(self, record: Record) -> dict:
        key, fields = self._item(record.data)
        sample = decode_sample(fields, self.task, self.resolution)
        sample["key"] = key
        return sample

    def samples_per_epoch(self) -> int:
        """Slots of this rank in one epoch (good samples or skipped)."""
        rank, world = self.rank_world
        return len(range(rank, self._count(), world))


class FolderDataset(_ItemDataset):
    """Images with `.txt`/`.json` caption sidecars (or edit triplets) under a folder."""

    def _index(self, root: Path) -> None:
        self.root = root
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        groups: dict[str, dict[str, str]] = {}
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel = os.path.relpath(folder, self.root)
            for name in files:
                if name.startswith("."):
                    continue
                key, ext = split_file_name(name)
                key = key if rel == "." else f"{rel}/{key}"
                groups.setdefault(key, {})[ext] = name if rel == "." else f"{rel}/{name}"
        # Keep keys that have at least one file we understand; the rest is not data.
        want = {"image"} if self.task == "t2i" else {"source", "target"}
        self.items = []
        for key in sorted(groups):
            files = roles({ext: path for ext, path in groups[key].items()})
            if files.keys() & (want | {"text", "json", "instruction"}):
                self.items.append((key, files))
        if not self.items:
            raise DataError(f"no {self.task} samples under {self.root} (expected images with .txt/.json captions)")

    def _source_id(self) -> str:
        return f"folder({self.root.resolve()}, {len(self.items)} items, {self.task}, {self.resolution})"

    def _count(self) -> int:
        return len(self.items)

    def _where(self, record: Record) -> str:
        return str(self.root / self.items[record.data][0])

    def _item(self, i: int) -> tuple[str, dict[str, Any]]:
        key, files = self.items[i]
        return key, {role: self.root / rel for role, rel in files.items()}


class JsonlDataset(_ItemDataset):
    """Samples listed in a JSONL manifest (see the module docstring for the fields)."""

    IMAGE_KEYS = ("file", "image", "path")

    def _index(self, manifest: Path) -> None:
        self.manifest = manifest
        if not self.manifest.is_file():
            raise FileNotFoundError(f"manifest {self.manifest} does not exist")
        self.base_dir = self.manifest.parent
        offsets = []
        with open(self.manifest, "rb") as f:
            pos = 0
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        if not offsets:
            raise DataError(f"manifest {self.manifest} has no lines")
        self.offsets = np.asarray(offsets, dtype=np.int64)

    def _source_id(self) -> str:
        return f"jsonl({self.manifest.resolve()}, {len(self.offsets)} lines, {self.task}, {self.resolution})"

    def _count(self) -> int:
        return len(self.offsets)

    def _line(self, i: int) -> dict[str, Any]:
        with open(self.manifest, "rb") as f:
            f.seek(int(self.offsets[i]))
            line = f.readline()
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SkipSample(f"bad manifest line: {e}") from None
        if not isinstance(obj, dict):
            raise SkipSample(f"bad manifest line: expected a JSON object, got {type(obj).__name__}")
        return obj

    def _path(self, value: Any, what: str) -> Path:
        if not isinstance(value, str) or not value:
            raise SkipSample(f"missing {what} image: no path in the manifest line")
        path = Path(value)
        return path if path.is_absolute() else self.base_dir / path

    def _item(self, i: int) -> tuple[str, dict[str, Any]]:
        obj = self._line(i)
        fields: dict[str, Any] = {}
        if self.task == "t2i":
            value = next((obj[k] for k in self.IMAGE_KEYS if k in obj), None)
            fields["image"] = self._path(value, "image")
            text = next((obj[k] for k in ("caption", "text", "prompt") if isinstance(obj.get(k), str)), None)
            if "plan" in obj:  # self-CoT: the thought written between the caption and the image
                if not (isinstance(obj["plan"], str) and obj["plan"].strip()):
                    raise SkipSample(f"bad plan: expected non-empty text, got {obj['plan']!r}")
                fields["plan"] = obj["plan"].strip()
        else:
            fields["source"] = self._path(obj.get("source"), "source")
            fields["target"] = self._path(obj.get("target"), "target")
            text = obj.get("instruction") if isinstance(obj.get("instruction"), str) else None
        if text is None:
            what = "caption: no 'caption'/'text'/'prompt'" if self.task == "t2i" else "instruction: no 'instruction'"
            raise SkipSample(f"missing {what} string in the manifest line")
        fields["text"] = text
        key = str(obj.get("key") or Path(str(fields.get("image") or fields["target"])).stem)
        return key, fields

    def _where(self, record: Record) -> str:
        return f"{self.manifest} entry {int(record.data) + 1}"


def open_dataset(source: str | os.PathLike | list, resolution: int = 256, task: str = "t2i",
                 **kwargs: Any) -> StreamDataset:
    """The loader for `source`: a folder, a `.jsonl` manifest, or WebDataset shards (tar paths,
    brace patterns, http(s) URLs, or a list of them). kwargs go to the loader."""
    from .webdataset import ShardDataset

    if not isinstance(source, (list, tuple)):
        text = os.fspath(source)
        if not text.startswith(("http://", "https://")) and Path(text).is_dir():
            return FolderDataset(text, resolution, task, **kwargs)
        if text.endswith(".jsonl"):
            return JsonlDataset(text, resolution, task, **kwargs)
    return ShardDataset(source, resolution, task, **kwargs)
