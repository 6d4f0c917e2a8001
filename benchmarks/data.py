"""Data throughput: the shapes renderer and the WebDataset loader, at 64 and 256 px (CPU).

  renderer      samples/s of `make_sample` + `render` (caption, scene, pixels as uint8), one process;
                and of `ShapesDataset` (the same plus the (3, S, S) float tensor), one process
  webdataset    samples/s of `ShardDataset` reading shapes shards written by `nextstep data shapes`
                (tar read, PNG decode, bucket fit, tensor) in the training process; then the same with
                the `Collator` (tokenized batches of 32), through a DataLoader with 0 and 2 workers.
                On a 2-core machine the 2 workers share the cores with the training process, which
                unpickles every batch, so they cannot double the rate there.

    python benchmarks/data.py [--sizes 64 256] [--seconds 3] [--num 2000]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from nextstep.cli import main as cli
from nextstep.data import Collator, ShardDataset
from nextstep.shapes import ShapesConfig, ShapesDataset, make_sample, render
from nextstep.text import TextTokenizer

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference-tiny" / "model"


def rate(fn, seconds: float) -> float:
    """Calls of fn per second, run for about `seconds` after one warm-up call."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def renderer_rate(size: int, seconds: float) -> float:
    config = ShapesConfig(size=size, seed=0)
    k = iter(range(10**9))
    return rate(lambda: render(make_sample(config, next(k)).scene), seconds)


def dataset_rate(size: int, seconds: float) -> float:
    it = iter(ShapesDataset(size=size, seed=0))
    return rate(lambda: next(it), seconds)


def loader_rate(pattern: str, size: int, workers: int, collate=list, batch_size: int = 32) -> float:
    ds = ShardDataset(pattern, resolution=size, shuffle_buffer=100)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                        persistent_workers=False)
    n, t0 = 0, None
    for i, batch in enumerate(loader):
        if i == 0:  # start the clock after worker start-up and the first batch
            t0 = time.perf_counter()
            continue
        n += len(batch) if isinstance(batch, list) else batch["input_ids"].shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per renderer measurement")
    parser.add_argument("--num", type=int, default=2000, help="samples in the benchmark shards")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = TextTokenizer.from_pretrained(TOKENIZER) if TOKENIZER.is_dir() else None

    print(f"data throughput, samples/s ({torch.get_num_threads()} torch thread(s) in the main process)\n")
    print("| size | renderer (render) | ShapesDataset (tensors) | shards, samples | shards + Collator, "
          "0 workers | shards + Collator, 2 workers |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            with contextlib.redirect_stdout(io.StringIO()):  # the CLI prints the shard pattern
                cli(["data", "shapes", "--out", tmp, "--num", str(args.num), "--size", str(size),
                     "--format", "webdataset", "--shard-size", "250"])
            pattern = str(Path(tmp) / f"shapes-{{000000..{(args.num - 1) // 250:06d}}}.tar")
            cells = [renderer_rate(size, args.seconds), dataset_rate(size, args.seconds),
                     loader_rate(pattern, size, 0)]
            for workers in (0, 2):
                cells.append(loader_rate(pattern, size, workers, Collator(tok)) if tok else float("nan"))
        print(f"| {size} | " + " | ".join(f"{c:,.0f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
