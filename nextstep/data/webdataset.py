"""WebDataset tar shards, read with the standard library and streamed from disk or http(s).

A shard is a tar file whose members are grouped into samples by key: the member
path up to the first dot of its file name (`a/0001.source.png` -> key
`a/0001`, extension `source.png`), consecutive members sharing a key. Roles of
the extensions are those of `records`.

Shards are named by brace patterns (`data/shard-{000000..000099}.tar`,
`{a,b}`) or lists of them; paths may be local, `file://` or `http(s)://` (read
as a stream with `urllib`, never downloaded whole). An epoch shuffles the shard
list with (seed, epoch), deals it to ranks, then to workers; each worker reads
its shards in turn through a shuffle buffer of raw samples. A shard's slots are
its samples in tar order, so a resume re-reads a partly consumed shard and
skips what was consumed (for http this re-downloads the consumed prefix).

Why not the `webdataset` package: it would be a new dependency, and its resume
is approximate; exact "every sample once, resumable" needs control over the
splitting and the position anyway, and a sequential tar reader is a few lines
of `tarfile`.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from ..io.atomic import atomic_write
from .records import check_task, decode_sample, roles
from .stream import DataError, Record, Skip, StreamDataset, UnitEnd, epoch_order, logger

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`x-{000..002}.tar` -> [x-000.tar, x-001.tar, x-002.tar]; `{a,b}` -> alternatives; nested left to right."""
    m = _BRACE.search(pattern)
    if m is None:
        if "{" in pattern or "}" in pattern:
            raise DataError(f"unbalanced braces in shard pattern {pattern!r}")
        return [pattern]
    body = m.group(1)
    if ".." in body:
        lo, _, hi = body.partition("..")
        if not (lo.isdigit() and hi.isdigit()):
            raise DataError(f"shard pattern {pattern!r}: a range must be {{START..END}} of digits, got {{{body}}}")
        if int(hi) < int(lo):
            raise DataError(f"shard pattern {pattern!r}: range {{{body}}} ends before it starts")
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [x for opt in options for x in expand_braces(head + opt + tail)]


def expand_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """A pattern, a path, or a list of them -> the list of shard paths/URLs."""
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    out = [u for item in items for u in expand_braces(os.fspath(item))]
    if not out:
        raise DataError("no shards given")
    return out


def is_url(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def open_shard(url: str, timeout: float = 60.0, retries: int = 2) -> IO[bytes]:
    """A binary stream of a shard: a local file, file:// or http(s):// (retried on connection errors)."""
    if is_url(url):
        for attempt in range(retries + 1):
            try:
                return urllib.request.urlopen(url, timeout=timeout)
            except urllib.error.HTTPError:
                raise  # 404 and friends do not get better by retrying
            except (urllib.error.URLError, OSError):
                if attempt == retries:
                    raise
                time.sleep(0.5 * 2**attempt)
    path = url[len("file://"):] if url.startswith("file://") else url
    return open(path, "rb")


class _TailReader:
    """A read-only stream wrapper that remembers the last bytes read, so the end of a tar can be checked."""

    KEEP = 1 << 16

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.pos, self.tail = stream, 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.pos += len(data)
        self.tail = (self.tail + data)[-self.KEEP:]
        return data

    def block_at(self, offset: int, size: int = tarfile.BLOCKSIZE) -> bytes:
        start = self.pos - len(self.tail)
        return self.tail[offset - start: offset - start + size] if offset >= start else b""


def iter_tar(stream: IO[bytes]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a tar stream, in order (read sequentially).

    Raises `tarfile.ReadError` for a truncated or corrupt tar. (Python's stream
    mode stops quietly at a bad header or at end of data; we check that each
    member is whole and, for an uncompressed tar, that it stopped at the
    all-zero end-of-archive block, so a cut shard is reported, not silently short.)
    """
    key, fields = None, {}
    reader = _TailReader(stream)
    with tarfile.open(fileobj=reader, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            data = tar.extractfile(member).read()
            if len(data) != member.size:
                raise tarfile.ReadError(f"member {member.name} is truncated ({len(data)} of {member.size} bytes)")
            folder, _, name = member.name.rpartition("/")
            if name.startswith("."):
                continue  # hidden files, macOS ._ resource forks
            stem, _, ext = name.partition(".")
            k = f"{folder}/{stem}" if folder else stem
            if k != key and fields:
                yield key, fields
                fields = {}
            key = k
            fields[ext] = data
        if getattr(tar.fileobj, "comptype", "tar") == "tar":
            end = reader.block_at(tar.offset)
            if len(end) != tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"truncated or corrupt tar: no end-of-archive block at byte {tar.offset}")
    if fields:
        yield key, fields


class ShardDataset(StreamDataset):
    """Samples from WebDataset shards: t2i {"caption", "pixels"} or edit {"instruction", "source", "target"}."""

    def __init__(self, urls: str | os.PathLike | Sequence[str | os.PathLike], resolution: int = 256,
                 task: str = "t2i", seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000,
                 rank: int | None = None, world_size: int | None = None, timeout: float = 60.0) -> None:
        super().__init__(seed=seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer, rank=rank,
                         world_size=world_size)
        self.urls = expand_urls(urls)
        self.task = check_task(task)
        self.resolution = resolution
        self.timeout = timeout
        missing = [u for u in self.urls if not is_url(u) and not Path(u.removeprefix("file://")).exists()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) not found, e.g. {missing[0]}")

    def _source_id(self) -> str:
        return f"shards({len(self.urls)}: {self.urls[0]} .. {self.urls[-1]}, {self.task}, {self.resolution})"

    def rank_shards(self, rank: int, world: int) -> list[str]:
        """The shards rank `rank` reads in this epoch, in order."""
        order = epoch_order(len(self.urls), self.seed, self.epoch, self.shuffle)
        return [self.urls[int(i)] for i in order[rank::world]]

    def _read(self, rank: int, world: int, wid: int, nw: int) -> Iterator[Record | Skip | UnitEnd]:
        todo = [u for u in self.rank_shards(rank, world) if not self.unit_finished(u)]
        if len(todo) < nw and wid == 0:
            logger.warning("rank %d has %d shard(s) left for %d workers: some workers idle (use more shards)",
                           rank, len(todo), nw)
        for url in todo[wid::nw]:
            done = self.done.get(url)
            n = 0
            try:
                with open_shard(url, self.timeout) as stream:
                    for key, fields in iter_tar(stream):
                        if done is None or n not in done:
                            yield Record(url, n, key, fields)
                        n += 1
            except Exception as e:  # corrupt, truncated or unreachable: skip the rest of the shard
                if n == 0 and isinstance(e, tarfile.ReadError) and "empty" in str(e):
                    yield Skip(url, None, "empty shard", url)
                else:
                    yield Skip(url, None, f"unreadable shard ({type(e).__name__})",
                               f"{url} after {n} samples: {e}")
                continue
            if n == 0:
                yield Skip(url, None, "empty shard", url)
            yield UnitEnd(url, n)

    def _decode(self, record: Record) -> dict:
        return decode_sample(roles(record.data), self.task, self.resolution)

    def _where(self, record: Record) -> str:
        return f"{record.unit} sample {record.slot} ({record.key})"


class ShardWriter:
    """Writes samples into numbered tar shards `folder/prefix-000000.tar`, ... of `shard_size` samples.

    Each shard is assembled in memory and written atomically, so a shard on disk
    is always complete. Use as a context manager (or call `close()`).
    """

    def __init__(self, folder: str | os.PathLike, prefix: str = "shard", shard_size: int = 1000) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.folder, self.prefix, self.shard_size = Path(folder), prefix, shard_size
        self.paths: list[Path] = []
        self._members: list[tuple[str, bytes]] = []
        self._count = 0

    def write(self, key: str, fields: dict[str, bytes | str]) -> None:
        """Add a sample: extension -> content (str is UTF-8 encoded)."""
        if "." in key.rpartition("/")[2]:
            raise ValueError(f"sample key {key!r} must not contain a dot (the dot starts the extension)")
        for ext, value in fields.items():
            self._members.append((f"{key}.{ext}", value.encode() if isinstance(value, str) else value))
        self._count += 1
        if self._count == self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._count:
            return
        path = self.folder / f"{self.prefix}-{len(self.paths):06d}.tar"
        members, self._members, self._count = self._members, [], 0
        atomic_write(path, lambda tmp: _write_tar(tmp, members))
        self.paths.append(path)

    def close(self) -> None:
        self.flush()

    def pattern(self) -> str:
        """A brace pattern naming every shard written."""
        n = len(self.paths)
        if n == 1:
            return str(self.paths[0])
        return str(self.folder / f"{self.prefix}-{{{0:06d}..{n - 1:06d}}}.tar")

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()


def _write_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed mtime: same input, same bytes
            tar.addfile(info, io.BytesIO(data))
