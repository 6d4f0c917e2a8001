"""Training checkpoints: written atomically, the last K kept, a damaged one skipped with a message.

A checkpoint is a folder `RUN/checkpoints/step_00000100/` holding `meta.json`
(step, data positions, optimizer hyper-parameters, and the byte size
of every other file in the folder) and the tensors, in one of two formats:

- `tensors.safetensors`: model, optimizer and RNG tensors under flat names,
  written by a single process (`save`);
- `sharded/`: a `torch.distributed.checkpoint` folder (one file per rank plus
  `.metadata`), written by every rank of a torchrun job (`begin` + `commit`,
  see `distributed.py`), readable by any number of ranks.

Either way the folder is written under a temporary name and renamed into
place, so a folder with a final name is always complete; a checkpoint damaged
later (e.g. truncated on disk) fails its size check on load and the previous
one is used instead, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

logger = logging.getLogger("nextstep.training")

TENSORS = "tensors.safetensors"
SHARDED = "sharded"  # the torch.distributed.checkpoint folder
META = "meta.json"
PREFIX = "step_"


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """torch optimizer state_dict -> (flat tensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            key = f"optim.{idx}.{name}"
            if isinstance(value, Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(rest["scalars"].items()):
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


class CheckpointManager:
    def __init__(self, out_dir: str | os.PathLike, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.dir = Path(out_dir) / "checkpoints"
        self.keep_last = keep_last

    def steps(self) -> list[int]:
        """Steps of the checkpoints on disk (complete by construction), newest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit():
                found.append(int(p.name[len(PREFIX):]))
        return sorted(found, reverse=True)

    def path(self, step: int) -> Path:
        return self.dir / f"{PREFIX}{step:08d}"

    def tmp_path(self, step: int) -> Path:
        """Where checkpoint `step` is written before it is renamed into place (the same on every rank)."""
        return self.dir / f".tmp-{self.path(step).name}"

    def begin(self, step: int) -> Path:
        """An empty temporary folder for checkpoint `step` (a leftover of a crashed save is removed)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_path(step)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp

    def commit(self, step: int, meta: dict[str, Any]) -> Path:
        """Finish the folder `begin(step)` made: write meta.json (with every file's size), flush, rename
        it into place, then drop all but the newest `keep_last` checkpoints."""
        tmp, final = self.tmp_path(step), self.path(step)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        meta = {**meta, "step": step, "files": {p.relative_to(tmp).as_posix(): p.stat().st_size for p in files}}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        for f in files + [tmp / META]:
            _fsync(f)
        for d in sorted({f.parent for f in files} | {tmp}, key=lambda d: len(d.parts), reverse=True):
            _fsync(d)
        if final.exists():  # a re-run of the same step: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(self.dir)
        for old in self.steps()[self.keep_last:]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return final

    def save(self, step: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
        """Write a single-process checkpoint `step` (tensors + meta) atomically; keep the newest `keep_last`."""
        tmp = self.begin(step)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
            return self.commit(step, meta)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def check(self, step: int) -> dict[str, Any]:
        """The meta of checkpoint `step` after checking that every file it lists is whole;
        raises ValueError naming the problem."""
        folder = self.path(step)
        try:
            meta = json.loads((folder / META).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{folder / META}: unreadable ({e})") from None
        files = meta.get("files")
        if not isinstance(files, dict) or not files:
            raise ValueError(f"{folder / META}: lists no files")
        for name, written in files.items():
            path = folder / name
            size = path.stat().st_size if path.is_file() else -1
            if size != written:
                raise ValueError(f"{path}: {size} bytes on disk, {written} written (truncated or replaced)")
        return meta

    def load(self, step: int, device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Read single-process checkpoint `step`, checking that it is whole; raises ValueError naming the problem."""
        meta = self.check(step)
        folder = self.path(step)
        if TENSORS not in meta["files"]:
            raise ValueError(f"{folder} is a sharded checkpoint: load it with nextstep.training.distributed")
        try:
            with safe_open(str(folder / TENSORS), framework="pt", device=str(device)) as f:
                tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{folder / TENSORS}: unreadable ({e})") from None
        return tensors, meta

    def load_latest(self, device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """The newest readable checkpoint, skipping damaged ones with a warning; None if there is none."""
        for step in self.steps():
            try:
                return self.load(step, device)
            except ValueError as e:
                logger.warning("checkpoint at step %d is damaged, using an earlier one: %s", step, e)
        return None


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk; a no-op where that is not possible."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
