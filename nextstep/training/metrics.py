"""The run folder's `metrics.jsonl`, written the same way by both training loops.

One JSON object per logged step, `step` first. A resumed run redoes the steps
after its checkpoint, so opening the log drops their lines (and a line torn by
a kill): the file then reads as one uninterrupted run. With `tensorboard` every
value but `step` also goes to `RUN/tensorboard`.

A folder holding a run (checkpoints or a metrics log) is only ever resumed,
never overwritten: `refuse_to_overwrite`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io.atomic import atomic_write
from .checkpoint import CheckpointManager

METRICS = "metrics.jsonl"

logger = logging.getLogger("nextstep.training")


def refuse_to_overwrite(out: Path, resume: bool) -> None:
    """A ConfigError if `out` already holds a run and `resume` is off."""
    if not resume and (CheckpointManager(out).steps() or (out / METRICS).exists()):
        raise ConfigError(f"run folder {out} already holds a run (checkpoints or {METRICS}); "
                          "resume it (--resume) or choose another out_dir")


def _lines_upto(path: Path, step: int) -> list[str]:
    """The lines with a step <= `step`; unreadable lines (a torn last one) are dropped."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    return kept


class MetricsLog:
    """`RUN/metrics.jsonl`, cut back to `resumed_step` (0 for a new run), then appended to line by line."""

    def __init__(self, out: Path, resumed_step: int, tensorboard: bool = False) -> None:
        self.path = Path(out) / METRICS
        kept = "".join(line + "\n" for line in _lines_upto(self.path, resumed_step))
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(kept))
        self._file = open(self.path, "a")
        self._board = _tensorboard_writer(Path(out)) if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a kill loses at most the line being written
        if self._board is not None:
            for key, value in record.items():
                if key != "step":
                    self._board.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._board is not None:
            self._board.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info("TensorBoard logging off: install nextstep[tensorboard] to enable it")
        return None
    return SummaryWriter(str(out / "tensorboard"))
