"""Peak GPU memory of loading a full-size random checkpoint quantized, next to `nextstep plan` (needs CUDA).

Writes random bf16 weights with NextStep-1-Large's shapes (about 15B
parameters, 28 GiB, official layout, ~5 GiB shards) into a temporary folder,
then, for each mode, in a fresh process: `load_model(folder, cuda, bfloat16,
quantize=MODE)`, `torch.cuda.max_memory_allocated()` over the load, the
weights' bytes as loaded (`nextstep.quantize.weight_bytes`) and, next to them,
what `nextstep.plan.plan_memory` says for the same config and mode (its
weights without the VAE, and weights + its loading transient). fp8 needs
compute capability >= 8.9, int4 >= 8.0; a mode the GPU lacks is reported as
refused. Needs about 30 GiB of disk and 16 CPU cores' worth of patience for the
write (a few minutes).

    python benchmarks/quantize_gpu.py [--modes int8 fp8 int4] [--tmpdir DIR] [--layers N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_memory_quant import write_checkpoint  # noqa: E402

GIB = 2**30
SHARD_BYTES = 5 * GIB


def child(folder: Path, mode: str) -> None:
    from nextstep.io import load_model
    from nextstep.quantize import QuantizationError, weight_bytes

    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        model = load_model(folder, device, torch.bfloat16, quantize=None if mode == "bf16" else mode)
    except QuantizationError as e:
        print(json.dumps({"refused": str(e)}))
        return
    torch.cuda.synchronize(device)
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak": torch.cuda.max_memory_allocated(device),
                      "allocated": torch.cuda.memory_allocated(device), "weights": weight_bytes(model)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["int8", "fp8", "int4"], choices=["bf16", "int8", "fp8", "int4"])
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's 48)")
    ap.add_argument("--tmpdir", default=None, help="where to write the temporary checkpoint")
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(Path(args.child[0]), args.child[1])
    if not torch.cuda.is_available():
        sys.exit("quantize_gpu.py needs a CUDA GPU")

    from nextstep.plan import plan_memory, preset
    from nextstep.vae.config import VAEConfig

    config = preset("NextStep-1-Large")
    if args.layers is not None:
        config.num_hidden_layers = args.layers
    vae = VAEConfig.from_dict({}, config.family)
    folder = Path(tempfile.mkdtemp(prefix="nextstep-quant-gpu-", dir=args.tmpdir))
    results = {}
    try:
        t0 = time.perf_counter()
        n_params, nbytes = write_checkpoint(folder, config, SHARD_BYTES, device="cuda")
        torch.cuda.empty_cache()
        print(f"{torch.cuda.get_device_name()} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))}),"
              f" torch {torch.__version__}; random NextStep-1-Large-shaped checkpoint: {n_params / 1e9:.2f}B params, "
              f"{nbytes / GIB:.2f} GiB bf16 (written in {time.perf_counter() - t0:.0f} s)\n")
        for mode in args.modes:
            proc = subprocess.run([sys.executable, __file__, "--child", str(folder), mode], capture_output=True,
                                  text=True)
            if proc.returncode:
                sys.exit(f"{mode} child failed:\n{proc.stderr}")
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print(f"{'mode':6}  {'weights':>9}  {'plan':>9}  {'load peak':>10}  {'plan load':>10}  {'peak/plan':>9}  {'s':>6}  (GiB)")
    for mode, r in results.items():
        if "refused" in r:
            print(f"{mode:6}  refused: {r['refused']}")
            continue
        plan = plan_memory(config, vae, height=512, width=512, batch=1, cfg=7.5, steps=28, dtype=torch.bfloat16,
                           quantize=None if mode == "bf16" else mode)
        plan_weights = plan.weights["total"] - plan.weights["vae"]  # load_model reads no VAE
        plan_load = plan_weights + plan.activations["load"]
        print(f"{mode:6}  {r['weights']['total'] / GIB:9.2f}  {plan_weights / GIB:9.2f}  {r['peak'] / GIB:10.2f}  "
              f"{plan_load / GIB:10.2f}  {r['peak'] / plan_load:9.3f}  {r['seconds']:6.0f}")
    print(f"\n(weights: as loaded, nextstep.quantize.weight_bytes; load peak: torch.cuda.max_memory_allocated over "
          f"load_model; plan: nextstep.plan.plan_memory at 512 px, batch 1, cfg 7.5)")
    print(f"temporary folder {folder} removed: {not folder.exists()}")


if __name__ == "__main__":
    main()
