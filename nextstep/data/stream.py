"""Streams of samples split across ranks and DataLoader workers, with a resumable position.

Every loader in `nextstep.data` is a `StreamDataset`: an `IterableDataset` whose
samples come from *units* (one WebDataset shard; or the whole list of a folder's
or manifest's items; or the shapes world's endless index), each unit a sequence
of *slots* 0, 1, 2, ... (a shard's samples in tar order; this rank's share of the
epoch's shuffled item order). A slot is one sample, good or bad.

Splitting. For epoch e, the units (shards) or the items are shuffled with
(seed, e) and dealt round-robin to the `world_size` ranks; each rank deals what
is left of its share round-robin to its DataLoader workers. No slot goes to two
workers of any rank, and every slot goes to one, so an epoch yields every good
sample exactly once.

Position. A rank's *position* is (epoch, the set of slots its training loop has
consumed). A slot is consumed when the loop has received the sample from that
slot, or a later sample of the same worker that carries the news that the slot
was skipped (corrupt file, missing caption, ...). Each sample carries that
bookkeeping under the key `"__meta__"` (a worker whose last slots were bad ends
with a sample holding only that: `is_bookkeeping`); `mark_consumed(batch)` records it in the
dataset object of the main process, `state_dict()` returns it, and after
`load_state_dict()` a new iterator deals out only the slots not yet consumed, to
any number of workers: no repeats, no gaps. Samples prefetched by workers but
never received are simply dealt again. The set is stored compactly as "every
slot below N" plus the few consumed out of order (`DoneSet`).

Bad samples are skipped, counted (`stats`) and logged on the `nextstep.data`
logger; a bad file never stops an epoch.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

logger = logging.getLogger("nextstep.data")

META = "__meta__"
STATE_VERSION = 1


class DataError(ValueError):
    """A data source or a saved position that cannot be used (named in the message)."""


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): the arguments if given, else torch.distributed's, else torchrun's env, else (0, 1)."""
    if rank is None and world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    rank, world_size = rank or 0, world_size or 1
    if not (isinstance(rank, int) and isinstance(world_size, int) and 0 <= rank < world_size):
        raise DataError(f"rank must be in [0, world_size), got rank={rank!r}, world_size={world_size!r}")
    return rank, world_size


def worker() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class DoneSet:
    """A set of non-negative integers stored as `prefix` (all of 0..prefix-1) plus sorted `extra`."""

    def __init__(self, prefix: int = 0, extra: list[int] | None = None) -> None:
        self.prefix = prefix
        self.extra: set[int] = set()
        for i in extra or ():
            self.add(i)

    def add(self, i: int) -> bool:
        """Mark i done; False if it already was."""
        if i < self.prefix or i in self.extra:
            return False
        self.extra.add(i)
        while self.prefix in self.extra:
            self.extra.remove(self.prefix)
            self.prefix += 1
        return True

    def __contains__(self, i: int) -> bool:
        return i < self.prefix or i in self.extra

    def __len__(self) -> int:
        return self.prefix + len(self.extra)

    def todo(self, stop: int | None = None) -> Iterator[int]:
        """The integers not done, ascending, below `stop` (endless without it)."""
        i = self.prefix
        while stop is None or i < stop:
            if i not in self.extra:
                yield i
            i += 1

    def to_dict(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "extra": sorted(self.extra)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DoneSet":
        return cls(int(d["prefix"]), [int(i) for i in d["extra"]])


@dataclass
class Record:
    """A raw sample read from a unit, before decoding (kept small: it may wait in a shuffle buffer)."""

    unit: str
    slot: int
    key: str
    data: Any


@dataclass
class Skip:
    """A slot (or, with slot None, a whole unit) that gave no sample, and why."""

    unit: str
    slot: int | None
    reason: str
    where: str = ""


@dataclass
class UnitEnd:
    """The worker read `unit` to its end: it has `size` slots."""

    unit: str
    size: int


class StreamDataset(IterableDataset):
    """Base of the loaders: splitting, shuffle buffer, skip handling and the resumable position.

    Subclasses implement `_read(rank, world, wid, nw)`, yielding `Record`, `Skip`
    and `UnitEnd` events for the slots this worker owns and has not consumed, and
    `_decode(record)`, which turns a record into a sample dict or raises (any
    exception skips the sample).
    """

    def __init__(self, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 0,
                 rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__()
        if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise DataError(f"shuffle_buffer must be a non-negative integer, got {shuffle_buffer!r}")
        self.seed = int(seed)
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self._rank, self._world = rank, world_size
        self.epoch = 0
        self.done: dict[str, DoneSet] = {}
        self.sizes: dict[str, int] = {}  # units read to the end: their number of slots
        self.stats: Counter[str] = Counter()  # skip reasons, counted when consumed
        self.consumed = 0

    # ------------------------------------------------------------------ position
    @property
    def rank_world(self) -> tuple[int, int]:
        return dist_info(self._rank, self._world)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` (its own shuffle) with nothing consumed. Call before creating the
        DataLoader iterator. The current epoch keeps its position, so a resumed loop may call
        set_epoch(saved epoch) unconditionally."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.done, self.sizes = {}, {}

    def unit_finished(self, unit: str) -> bool:
        size = self.sizes.get(unit)
        return size is not None and unit in self.done and self.done[unit].prefix >= size

    def mark_consumed(self, batch: dict | list[dict]) -> None:
        """Record that the training loop received `batch` (a collated batch, a sample, or a list of samples)."""
        if isinstance(batch, dict):
            metas = batch.get("meta") if META not in batch else [batch[META]]
        else:
            metas = [s[META] for s in batch]
        if metas is None:
            raise DataError("mark_consumed: the batch carries no sample bookkeeping ('meta' or '__meta__'); "
                            "collate with nextstep.data.Collator or keep '__meta__' as a list")
        for meta in metas:
            if meta["epoch"] != self.epoch:
                raise DataError(f"mark_consumed: a sample of epoch {meta['epoch']} arrived in epoch {self.epoch}; "
                                "call set_epoch() before creating the DataLoader iterator")
            for unit, slot, reason in meta["skipped"]:
                self.stats[reason] += 1
                if slot is not None:
                    self.done.setdefault(unit, DoneSet()).add(slot)
            for unit, size in meta["ended"]:
                self.sizes[unit] = size
            if meta["slot"] is not None:
                unit, slot = meta["slot"]
                self.done.setdefault(unit, DoneSet()).add(slot)
                self.consumed += 1

    def state_dict(self) -> dict[str, Any]:
        """The position (see the module docstring), plus counters. Plain JSON-able types."""
        rank, world = self.rank_world
        return {"version": STATE_VERSION, "kind": type(self).__name__, "seed": self.seed, "rank": rank,
                "world_size": world, "source": self._source_id(), "epoch": self.epoch,
                "done": {u: d.to_dict() for u, d in self.done.items()}, "sizes": dict(self.sizes),
                "consumed": self.consumed, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by `state_dict()` on the same rank of the same setup."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError(f"not a saved data position (version {STATE_VERSION}): {str(state)[:80]}")
        rank, world = self.rank_world
        mine = {"kind": type(self).__name__, "seed": self.seed, "rank": rank, "world_size": world,
                "source": self._source_id()}
        wrong = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if wrong:
            raise DataError("the saved data position belongs to another setup (saved, now): "
                            + "; ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in wrong.items()))
        self.epoch = int(state["epoch"])
        self.done = {u: DoneSet.from_dict(d) for u, d in state["done"].items()}
        self.sizes = {u: int(n) for u, n in state["sizes"].items()}
        self.consumed = int(state["consumed"])
        self.stats = Counter(state["stats"])

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict]:
        rank, world = self.rank_world
        wid, nw = worker()
        rng = random.Random(f"buffer:{self.seed}:{self.epoch}:{rank}:{wid}")
        buffer: list[Record] = []
        skipped: list[tuple[str, int | None, str]] = []
        ended: list[tuple[str, int]] = []
        n_logged = 0

        def emit(record: Record) -> dict | None:
            nonlocal n_logged
            try:
                sample = self._decode(record)
            except Exception as e:  # a bad file must never stop a long run
                reason = _reason(e)
                skipped.append((record.unit, record.slot, reason))
                n_logged = _log_skip(n_logged, f"{self._where(record)}: skipped ({reason}): {e}")
                return None
            sample.setdefault("key", record.key)
            sample[META] = {"epoch": self.epoch, "slot": (record.unit, record.slot),
                            "skipped": list(skipped), "ended": list(ended)}
            skipped.clear()
            ended.clear()
            return sample

        for event in self._read(rank, world, wid, nw):
            if isinstance(event, Skip):
                skipped.append((event.unit, event.slot, event.reason))
                n_logged = _log_skip(n_logged, f"{event.where or event.unit}: skipped ({event.reason})")
                continue
            if isinstance(event, UnitEnd):
                ended.append((event.unit, event.size))
                continue
            if self.shuffle and self.shuffle_buffer > 1:
                buffer.append(event)
                if len(buffer) < self.shuffle_buffer:
                    continue
                i = rng.randrange(len(buffer))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                event = buffer.pop()
            sample = emit(event)
            if sample is not None:
                yield sample
        rng.shuffle(buffer)
        for record in buffer:
            sample = emit(record)
            if sample is not None:
                yield sample
        if skipped or ended:
            # Nothing left to carry the news of the last skipped slots: send it alone, as a
            # sample holding only the bookkeeping (see `is_bookkeeping`).
            yield {META: {"epoch": self.epoch, "slot": None, "skipped": list(skipped), "ended": list(ended)}}

    # ------------------------------------------------------------------ subclass hooks
    def _read(self, rank: int, world: int, wid: int, nw: int) -> Iterator[Record | Skip | UnitEnd]:
        raise NotImplementedError

    def _decode(self, record: Record) -> dict:
        raise NotImplementedError

    def _source_id(self) -> str:
        """A short description of the source, stored in the position to catch a mismatched resume."""
        return ""

    def _where(self, record: Record) -> str:
        return f"{record.unit}[{record.slot}] {record.key}"

    def _todo(self, unit: str, stop: int | None = None) -> Iterator[int]:
        done = self.done.get(unit)
        return (DoneSet() if done is None else done).todo(stop)


def is_bookkeeping(sample: dict) -> bool:
    """Whether `sample` only carries position bookkeeping (a worker's last skips): no data to train on.

    A worker whose last slots were skipped ends with such a sample so that the
    skips are counted and the position can reach the end of the epoch. The
    Collator leaves these out of the batch rows (keeping their bookkeeping); a
    loop that iterates samples itself should pass them to `mark_consumed` and
    otherwise ignore them.
    """
    return set(sample) == {META}


class SkipSample(Exception):
    """Raised by a decoder for a sample that must be skipped; the message is the reason."""


def _reason(e: Exception) -> str:
    """A short, countable reason: the SkipSample message, or the exception type."""
    if isinstance(e, SkipSample):
        return str(e).split(":")[0]
    return f"unreadable ({type(e).__name__})"


def _log_skip(n_logged: int, message: str) -> int:
    # Every skip is counted; the log shows the first 20 of a worker, then one in 100.
    if n_logged < 20 or n_logged % 100 == 0:
        logger.warning(message)
    return n_logged + 1


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """0..n-1, shuffled with (seed, epoch) when `shuffle` (numpy: a 10M-item manifest takes ~0.2 s)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)
