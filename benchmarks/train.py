"""Training throughput of a stage config on this machine (one process, CPU or one GPU).

Runs the real training loop (`nextstep.training.train.train`: data, VAE encoding,
forward, backward, AdamW) for a few steps in fp32 and in bf16 autocast, and
reports the median step's samples/s and image tokens/s, plus the model FLOPs
utilisation (MFU): the model FLOPs of a step over its time, against the peak
of a large matmul measured here with the same thread count.

Model FLOPs of a step (multiply-add = 2 FLOPs; training = 3 x forward, the
backward pass costing two forwards; padding and the frozen VAE excluded):

    3 x 2 x [ P_decoder x T  +  P_lm_head x T_text  +  (P_in + P_out) x N_img
              + P_flow_head x N_img x fm_head_batch_mul ]
    + 3 x 2 x 2 x layers x attention_width x sum over rows of T_row^2

P_x: weights of the Linear layers of part x; T: non-padding tokens; T_text:
positions scored by the language head; N_img: image tokens; the attention term
is QK^T and AV over the full square (what the masked kernel computes). With
padding counted too, this is within 2% of what torch.utils.flop_counter counts
for a forward and backward pass.

    python benchmarks/train.py [--config recipes/shapes/1-pretrain.toml] [--size 64 --batch 32]
                               [--steps 8] [--threads 1] [--vae DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from nextstep.data import Collator
from nextstep.model import NextStep
from nextstep.training.config import TrainConfig
from nextstep.training.supervised import Batches
from nextstep.training.train import build_parts, train

REPO = Path(__file__).resolve().parents[1]
FIXTURE_VAE = REPO / "tests" / "fixtures" / "reference-tiny" / "vae"
WARMUP = 2  # steps left out of the timing (allocations, first-call overheads)


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` n x n matmuls."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def step_flops(model: NextStep, batch: dict, placeholder_id: int) -> float:
    """Model FLOPs of one training step on `batch` (see the module docstring)."""
    cfg = model.config
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    is_image = ids == placeholder_id
    tokens = int(valid.sum())
    n_img = int(is_image.sum())
    text_scored = int((valid[:, 1:] & ~is_image[:, 1:]).sum())
    matmul = (linear_weights(model.layers) * tokens + model.lm_head.weight.numel() * text_scored
              + (linear_weights(model.image_in_projector) + linear_weights(model.image_out_projector)) * n_img
              + linear_weights(model.image_head) * n_img * cfg.fm_head_batch_mul)
    width = cfg.num_attention_heads * cfg.head_dim
    attention = 2 * cfg.num_hidden_layers * width * int((valid.sum(1) ** 2).sum())
    return 3 * 2 * (matmul + attention)


def configure(args: argparse.Namespace, precision: str, out: Path) -> TrainConfig:
    config = TrainConfig.from_file(args.config)
    config.init_from = ""
    config.out_dir = str(out)
    config.steps = args.steps
    config.train.precision = precision
    config.train.checkpoint_every = 10**9  # only the final one, written after the last step's timing
    config.train.sample_every = 0
    config.train.sample_prompts = ["a red circle"]
    config.train.sample_settings = {"num_sampling_steps": 2}
    config.train.tensorboard = False
    config.model.vae = str(args.vae)
    if args.batch:
        config.data.batch_size = args.batch
    config.optim.grad_accum = 1
    for s in config.data.sources:
        if args.size:
            s.size = args.size
    return config


def measure(args: argparse.Namespace, precision: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = configure(args, precision, Path(tmp) / "run")
        with contextlib.redirect_stderr(io.StringIO()):  # the progress bar
            train(config)
        steps = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = steps[WARMUP:]
    step_s = statistics.median(config.data.batch_size / m["samples_per_s"] for m in timed)

    # The same batches again (the data is a pure function of the step), to count their tokens.
    model, tokenizer, _ = build_parts(config, torch.device("cpu"))
    batches = Batches(config, Collator(tokenizer, caption_dropout=config.data.caption_dropout, seed=config.seed),
                      config.data.batch_size, 0, 1)
    per_step = [batches.next(step, 0) for step in range(config.steps)][WARMUP:]
    flops = statistics.mean(step_flops(model, b, tokenizer.placeholder_id) for b in per_step)
    image_tokens = statistics.mean(int((b["input_ids"] == tokenizer.placeholder_id).sum()) for b in per_step)
    return {"precision": precision, "step_s": step_s, "samples_s": config.data.batch_size / step_s,
            "image_tokens_s": image_tokens / step_s, "flops": flops, "achieved": flops / step_s,
            "config": config, "model": model}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "recipes" / "shapes" / "1-pretrain.toml",
                   help="a stage config (its [model] and [data] are used; default: the shipped shapes model)")
    p.add_argument("--vae", type=Path, default=None,
                   help="VAE folder (default: the config's, else the tiny fixture VAE)")
    p.add_argument("--size", type=int, default=0, help="image side in pixels (default: the config's)")
    p.add_argument("--batch", type=int, default=0, help="global batch (default: the config's)")
    p.add_argument("--steps", type=int, default=8, help=f"steps per precision, the first {WARMUP} untimed")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU), for training and the peak")
    args = p.parse_args()
    if args.steps <= WARMUP:
        p.error(f"--steps must be more than {WARMUP}")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.vae is None:
        own = Path(TrainConfig.from_file(args.config).model.vae)
        args.vae = own if (own / "config.json").is_file() else FIXTURE_VAE
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    peaks = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}
    rows = [measure(args, precision) for precision in ("fp32", "bf16")]

    config, model = rows[0]["config"], rows[0]["model"]
    c = model.config
    source = config.data.sources[0]
    tokens_per_image = (source.size // 16) ** 2
    n_params = sum(p.numel() for p in model.parameters())
    where = f"{device.type}, {args.threads} thread(s)" if device.type == "cpu" else torch.cuda.get_device_name()
    print(f"config: {args.config} -> hidden {c.hidden_size}, {c.num_hidden_layers} layers, flow head "
          f"{c.fm_head_dim} x {c.fm_head_layers} (x{c.fm_head_batch_mul} batch), {n_params / 1e6:.1f}M params")
    print(f"data: {source.kind} {source.size} px ({tokens_per_image} tokens/image), global batch "
          f"{config.data.batch_size}; VAE {args.vae}; {where}")
    print(f"matmul peak (2048^3): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    print()
    print(f"{'precision':<10}{'step ms':>9}{'samples/s':>11}{'img tok/s':>11}{'GFLOP/step':>12}"
          f"{'GFLOP/s':>9}{'MFU':>7}")
    for r in rows:
        mfu = r["achieved"] / peaks[r["precision"]]
        print(f"{r['precision']:<10}{r['step_s'] * 1e3:>9.0f}{r['samples_s']:>11.1f}{r['image_tokens_s']:>11.0f}"
              f"{r['flops'] / 1e9:>12.2f}{r['achieved'] / 1e9:>9.1f}{mfu:>7.1%}")
    print("\nstep ms: median wall time of a training step (data, VAE encode, forward, backward, AdamW); "
          "MFU: model FLOPs/s over the same precision's matmul peak.")


if __name__ == "__main__":
    main()
