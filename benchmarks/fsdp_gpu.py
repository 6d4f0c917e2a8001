"""One stage-1 step of a full-width, reduced-depth NextStep under FSDP2 with NCCL: measured peak GPU
memory against `nextstep train --plan`'s.

The model is NextStep-1-Large's width (hidden 5120, MLP 13824, 40/8 heads, the 157M flow head with
batch_mul 4) with `--layers` decoder layers (default 4) and the shapes vocabulary (the official
152k vocabulary needs the official tokenizer); 256 px images (256 image tokens, as stage 1),
micro-batch 2 per GPU, bf16 parameters, fp32 reduction, activation checkpointing. On one GPU the
job is a world of one rank that is nevertheless sharded (FSDP2 from the meta device, as on N
ranks; every all-gather and reduce-scatter runs), so what it measures is the FSDP2 path; the plan
is made for the same shape. Prints one JSON line: measured peak (torch.cuda.max_memory_reserved
and _allocated) and the planned peak, in GiB, and their ratio.

    python benchmarks/fsdp_gpu.py [--layers 4] [--steps 1]        # one GPU; ~2 minutes
    python benchmarks/fsdp_gpu.py --device cpu --width 256         # a smoke run of this script, gloo
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VAE = REPO / "tests" / "fixtures" / "reference-tiny" / "vae"  # an f8, 16-channel VAE (its size is not planned against)


def write_config(folder: Path, layers: int, width: int, steps: int, device: str) -> Path:
    heads = max(2, width // 128)
    model = (f"{{ hidden_size = {width}, intermediate_size = {width * 27 // 10}, num_hidden_layers = {layers}, "
             f"num_attention_heads = {heads}, num_key_value_heads = {max(1, heads // 5)}, head_dim = 128, "
             f"fm_head_dim = {width * 3 // 10}, fm_head_layers = 12, fm_head_batch_mul = 4 }}")
    lines = [f'out_dir = "{folder / "run"}"', f"steps = {steps}", "seed = 42",
             "[model]", 'tokenizer = "shapes"', f'vae = "{VAE}"', f"config = {model}",
             "[data]", 'sources = [{ kind = "shapes", size = 256 }]', "batch_size = 2",
             "[optim]", "lr = 1e-4", "warmup_steps = 1",
             "[distributed]", 'param_dtype = "bf16"', 'reduce_dtype = "fp32"',
             "[train]", f'precision = "{"auto" if device == "cuda" else "fp32"}"', "grad_checkpointing = true",
             "checkpoint_every = 1000", "tensorboard = false"]
    path = folder / "stage.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def rank_main(config_path: str, out: str) -> None:
    """Inside torchrun: train with a world of one rank treated as sharded; record memory at the checkpoint."""
    import torch
    import torch.distributed as tdist

    from nextstep.training import distributed as dist
    from nextstep.training import train as training

    def setup() -> dist.Env:
        cuda = torch.cuda.is_available()
        tdist.init_process_group("nccl" if cuda else "gloo")
        return dist.Env(0, 1, torch.device("cuda", 0) if cuda else torch.device("cpu"))

    def record(*args, **kwargs) -> None:
        cuda = torch.cuda.is_available()
        peaks = {"reserved": torch.cuda.max_memory_reserved() if cuda else 0,
                 "allocated": torch.cuda.max_memory_allocated() if cuda else 0}
        Path(out).write_text(json.dumps(peaks))
        raise SystemExit(0)

    dist.Env.distributed = property(lambda self: True)  # a world of one, sharded all the same
    dist.setup, dist.save_checkpoint = setup, record
    from nextstep.training.config import TrainConfig

    training.train(TrainConfig.from_file(config_path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=5120)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    from nextstep.plan import GIB
    from nextstep.training.config import TrainConfig
    from nextstep.training.plan import training_plan

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config_path = write_config(folder, args.layers, args.width, args.steps, args.device)
        out = folder / "peaks.json"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
               "--master_port", str(port), __file__, "--rank-main", str(config_path), str(out)]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        peaks = json.loads(out.read_text())
        config = TrainConfig.from_file(config_path)
        plan = training_plan(config, 1, args.device, 141 * GIB, text_tokens=16, fsdp=True)
        print(plan.table())
        # torch's allocator does not see the CUDA context and NCCL's buffers: compare without the runtime row.
        planned = plan.peak_bytes - plan.rows["runtime (context, workspaces)"]
        measured = peaks["reserved"]
        print(json.dumps({"layers": args.layers, "width": args.width, "measured_reserved_gib": measured / GIB,
                          "measured_allocated_gib": peaks["allocated"] / GIB, "planned_gib": planned / GIB,
                          "planned_over_measured": planned / measured if measured else None}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-main":
        rank_main(sys.argv[2], sys.argv[3])
    else:
        main()
