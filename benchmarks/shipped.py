"""Speed of the shipped shapes model: seconds per 64x64 image at batch 1 and 64, and a cold first image.

    python benchmarks/shipped.py [--model DIR] [--runs 3] [--threads 2] [--compile] [--step-schedule fast]

Uses the model's own generation defaults (CFG, steps, sampler). The cold
start runs `nextstep generate` in a fresh process and times process start to
PNG written. `--compile` measures the batches a second time with the token loop
compiled (its warm-up reported apart); the cold start always uses the defaults.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nextstep import NextStepPipeline
from nextstep.sampling.compiled import CompiledLoop
from nextstep.sampling.flow import STEP_SCHEDULES

PROMPT = "a red circle to the left of a blue square"


def time_batch(pipe: NextStepPipeline, batch: int, runs: int) -> float:
    """Median seconds of one call generating `batch` images (after a warm-up)."""
    kwargs = dict(progress=False)  # the model's own settings
    pipe.generate_image(PROMPT, num_images_per_caption=batch, **kwargs)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        images = pipe.generate_image(PROMPT, num_images_per_caption=batch, **kwargs)
        times.append(time.perf_counter() - t0)
        assert len(images) == batch
    return statistics.median(times)


def cold_start(model: Path | None) -> float:
    """Seconds from `nextstep generate` process start to its PNG on disk."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "first.png"
        cmd = [sys.executable, "-m", "nextstep", "generate", PROMPT, "-o", str(out)]
        if model is not None:
            cmd += ["--model", str(model)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        elapsed = time.perf_counter() - t0
        assert out.is_file()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped model)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default=None, help="float32, bfloat16 or bf16-mixed (default: the model's choice)")
    ap.add_argument("--skip-cold", action="store_true", help="skip the cold-start measurement")
    ap.add_argument("--compile", action="store_true", help="also measure with the token loop compiled")
    ap.add_argument("--step-schedule", choices=STEP_SCHEDULES, default=None, help="flow steps per token")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = NextStepPipeline.from_pretrained(args.model, dtype=args.dtype)
    pipe.settings = pipe.settings.with_overrides(step_schedule=args.step_schedule)
    d = pipe.settings
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}, 1-min load {os.getloadavg()[0]:.2f}")
    print(f"defaults: {d}")
    print(f"weights {pipe.model.embed_tokens.weight.dtype}, autocast {pipe.autocast_dtype}")
    for mode in ["eager", "compiled"] if args.compile else ["eager"]:
        if mode == "compiled":
            pipe.compiled = CompiledLoop(pipe.device)
            t0 = time.perf_counter()
            for batch in (1, 64):
                pipe.generate_image(PROMPT, num_images_per_caption=batch, progress=False)
            print(f"compiled warm-up (first call of each batch): {time.perf_counter() - t0:.1f} s")
        one = time_batch(pipe, 1, args.runs)
        many = time_batch(pipe, 64, args.runs)
        print(f"{mode} batch  1: {one:.3f} s/call, {one:.3f} s/image, {1 / one:.1f} images/s")
        print(f"{mode} batch 64: {many:.3f} s/call, {many / 64:.4f} s/image, {64 / many:.1f} images/s")
        print(f"{mode} batch 64 / batch 1 images/s: {64 * one / many:.1f}x (target >= 8x)")
    if args.skip_cold:
        return
    cold = statistics.median(cold_start(args.model) for _ in range(3))
    print(f"cold first image (process start to PNG, median of 3): {cold:.2f} s (target < 5 s)")


if __name__ == "__main__":
    main()
