"""Training checkpoints: written atomically, the last K kept, a damaged one skipped with a message.

A checkpoint is a folder `RUN/checkpoints/step_00000100/` holding
`tensors.safetensors` (model, optimizer and RNG tensors, flat names) and
`meta.json` (step, scheduler, data position, optimizer hyper-parameters, and
the byte size of the tensor file). It is written under a temporary name and
renamed into place, so a folder with a final name is always complete; a
checkpoint damaged later (e.g. truncated on disk) fails its checks on load and
the previous one is used instead, with a warning.
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
    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.dir = Path(run_dir) / "checkpoints"
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

    def save(self, step: int, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
        """Write checkpoint `step` atomically, then drop all but the newest `keep_last`."""
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.path(step)
        tmp = self.dir / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
            meta = {**meta, "step": step, "tensor_bytes": (tmp / TENSORS).stat().st_size}
            (tmp / META).write_text(json.dumps(meta, indent=1))
            for f in (tmp / TENSORS, tmp / META):
                _fsync(f)
            _fsync(tmp)
            if final.exists():  # a re-run of the same step: replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync(self.dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.steps()[self.keep_last:]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return final

    def load(self, step: int, device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Read checkpoint `step`, checking that it is whole; raises ValueError naming the problem."""
        folder = self.path(step)
        try:
            meta = json.loads((folder / META).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{folder / META}: unreadable ({e})") from None
        size = (folder / TENSORS).stat().st_size if (folder / TENSORS).is_file() else -1
        if size != meta.get("tensor_bytes"):
            raise ValueError(f"{folder / TENSORS}: {size} bytes on disk, {meta.get('tensor_bytes')} written "
                             "(truncated or replaced)")
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
