"""`nextstep train CONFIG` with memory probes, for tests/test_fsdp_scale.py (run directly or under torchrun).

Writes `$NEXTSTEP_PROBE_DIR/rank{R}.json` with, in bytes:
- `train_peak`: the process's peak RSS (VmHWM) from its start through set-up and every training
  step, read when the first checkpoint begins (before any saving or export);
  (`NEXTSTEP_PROBE_CHECKPOINT=stop` then ends the run, `=skip` goes on without saving it);
- under torchrun, `export_base` / `export_peak`: the RSS when the export starts and the peak RSS
  during the export alone (the peak is reset through /proc/self/clear_refs first).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def status_bytes(field: str) -> int:
    """A memory line of /proc/self/status (e.g. VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> int:
    from nextstep.cli import main as cli
    from nextstep.training import distributed as dist
    from nextstep.training import export as exporting

    out = Path(os.environ["NEXTSTEP_PROBE_DIR"])
    rank = int(os.environ.get("RANK", "0"))
    record: dict[str, int] = {}

    def save(path: Path = out / f"rank{rank}.json") -> None:
        path.write_text(json.dumps(record))

    save_checkpoint, export_sharded = dist.save_checkpoint, exporting.export_sharded

    checkpoint = os.environ.get("NEXTSTEP_PROBE_CHECKPOINT", "")

    def probed_save(*args, **kwargs):
        record.setdefault("train_peak", status_bytes("VmHWM"))
        save()
        if checkpoint == "stop":  # the training peak is all this run is for
            raise SystemExit(0)
        if checkpoint != "skip":
            save_checkpoint(*args, **kwargs)

    def probed_export(*args, **kwargs):
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        record["export_base"] = status_bytes("VmRSS")
        export_sharded(*args, **kwargs)
        record["export_peak"] = status_bytes("VmHWM")
        save()

    dist.save_checkpoint, exporting.export_sharded = probed_save, probed_export
    return cli(["train", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
