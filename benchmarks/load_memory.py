"""Peak memory of `nextstep.io.load_model` on a ~1 GB synthetic sharded checkpoint (CPU, fp32).

The parent builds a random NextStep of about 1 GB, saves it with `save_model`
in ~200 MiB shards plus an index, records a checksum of every tensor, frees it
and starts a fresh Python process that loads the folder. The child records its
RSS before loading, samples VmRSS (and RssAnon / RssFile) every few ms from a
background thread while `load_model` runs, also reads VmHWM (reset before
loading where the kernel allows), and reports the peak increase relative to the
weights' size. Target: peak increase <= 1.3x the weights.

    python benchmarks/load_memory.py [--layers 16] [--shard-mib 200] [--interval-ms 5]

With `--quantize int8` it compares instead the peak RSS of loading *and*
generating one 64x64 image (`NextStepPipeline.from_pretrained(..., dtype=bf16)`)
without and with weight-only int8 (nextstep/quantize.py), each in a fresh
process, on a random bf16 checkpoint of about 1B parameters written in the
official layout (config.json, ~1 GiB shards plus index, tokenizer files, vae/;
the tokenizer and VAE are the shipped model's). Target: int8 peak <= 0.6x bf16.

    python benchmarks/load_memory.py --quantize int8 [--hidden 2048 --layers 20 --intermediate 5632]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

MIB = 2**20
LOAD_SHAPE = {"hidden": 1024, "layers": 16, "intermediate": 2816, "vocab": 32000}  # ~1 GB in fp32


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of every tensor, in name order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def saved_state(model) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


# --------------------------------------------------------------------------- child
class Sampler(threading.Thread):
    """Polls /proc/self/status; keeps the sample with the largest VmRSS."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval, self.stop, self.peak, self.samples = interval, threading.Event(), proc_status(), 0

    def run(self) -> None:
        while not self.stop.is_set():
            s = proc_status()
            self.samples += 1
            if s["VmRSS"] > self.peak["VmRSS"]:
                self.peak = s
            time.sleep(self.interval)


def file_mappings(folder: Path) -> tuple[int, int]:
    """(number of mappings, their total virtual size) of the checkpoint's files in this process."""
    n = size = 0
    with open("/proc/self/maps") as f:
        for line in f:
            if str(folder) in line:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                n, size = n + 1, size + hi - lo
    return n, size


def child(folder: Path, interval: float, dtype: torch.dtype) -> None:
    from nextstep.io import load_model

    gc.collect()
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    before = proc_status()
    sampler = Sampler(interval)
    sampler.start()
    t0 = time.perf_counter()
    model = load_model(folder, torch.device("cpu"), dtype)
    seconds = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    after = proc_status()
    mappings = file_mappings(folder)
    state = saved_state(model)
    digest = checksum({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    touched = proc_status()  # every weight byte has now been read once (as a first forward pass would)
    print(json.dumps({
        "before": before, "after": after, "peak": sampler.peak, "samples": sampler.samples, "touched": touched,
        "hwm_reset": hwm_reset, "seconds": seconds, "checksum": digest, "mappings": mappings,
        "loaded_bytes": sum(t.numel() * t.element_size() for t in state.values()),
    }))


# --------------------------------------------------------------------------- parent
def build_and_save(folder: Path, args) -> tuple[int, str, int]:
    from nextstep import NextStep, NextStepConfig
    from nextstep.io import save_model

    config = NextStepConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
        max_position_embeddings=4096, fm_head_dim=512, fm_head_layers=3,
        boi=args.vocab - 3, eoi=args.vocab - 2, image_placeholder_id=args.vocab - 1, pad_token_id_added=args.vocab - 4)
    torch.manual_seed(0)
    model = NextStep(config)  # PyTorch's default (random) initialisation
    state = saved_state(model)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    digest = checksum(state)
    save_model(model, folder, max_shard_bytes=args.shard_mib * MIB)
    n_params = sum(t.numel() for t in state.values())
    del model, state
    gc.collect()
    return nbytes, digest, n_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model shape: by default LOAD_SHAPE, or load_memory_quant.SHAPE with --quantize.
    for name in ("hidden", "layers", "intermediate", "vocab"):
        ap.add_argument(f"--{name}", type=int, default=None, help=f"default {LOAD_SHAPE[name]} "
                                                                  "(with --quantize: see load_memory_quant.py)")
    ap.add_argument("--shard-mib", type=int, default=200, help="max_shard_bytes for save_model, in MiB")
    ap.add_argument("--interval-ms", type=float, default=5.0, help="RSS sampling interval")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="load_model dtype")
    ap.add_argument("--tmpdir", default=None, help="where to write the temporary checkpoint")
    ap.add_argument("--quantize", choices=["int8", "int4", "fp8", "none"], default=None,
                    help="compare load+generate of a ~1B bf16 checkpoint with and without this mode")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--generate-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate_child:
        from load_memory_quant import generate_child
        return generate_child(args.generate_child, args.interval_ms / 1000, args.quantize)
    if args.child:
        return child(args.child, args.interval_ms / 1000, getattr(torch, args.dtype))
    if args.quantize not in (None, "none"):
        from load_memory_quant import compare
        return compare(args)
    for name, value in LOAD_SHAPE.items():
        setattr(args, name, value if getattr(args, name) is None else getattr(args, name))

    folder = Path(tempfile.mkdtemp(prefix="nextstep-load-bench-", dir=args.tmpdir))
    try:
        t0 = time.perf_counter()
        nbytes, digest, n_params = build_and_save(folder, args)
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        print(f"torch {torch.__version__}; synthetic checkpoint: {n_params / 1e6:.1f}M params, "
              f"{nbytes / MIB:.0f} MiB fp32 in {len(shards)} shards of <= {args.shard_mib} MiB "
              f"(built and saved in {time.perf_counter() - t0:.1f} s)")
        proc = subprocess.run([sys.executable, __file__, "--child", str(folder), "--interval-ms", str(args.interval_ms),
                               "--dtype", args.dtype],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"child failed:\n{proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    before, peak, after = r["before"], r["peak"], r["after"]
    base = before["VmRSS"]
    hwm_inc = after["VmHWM"] - base if r["hwm_reset"] else max(after["VmHWM"] - base, 0)
    rows = [
        ("RSS before load_model", base, None),
        ("peak RSS increase (sampled)", peak["VmRSS"] - base, (peak["VmRSS"] - base) / nbytes),
        ("  of which anonymous", peak["RssAnon"] - before["RssAnon"], (peak["RssAnon"] - before["RssAnon"]) / nbytes),
        ("  of which file-backed (mmap)", peak["RssFile"] - before["RssFile"],
         (peak["RssFile"] - before["RssFile"]) / nbytes),
        ("peak RSS increase (VmHWM" + ("" if r["hwm_reset"] else ", not reset") + ")", hwm_inc, hwm_inc / nbytes),
        ("RSS increase after load_model", after["VmRSS"] - base, (after["VmRSS"] - base) / nbytes),
        ("weights (saved tensors)", nbytes, 1.0),
        ("weights as loaded", r["loaded_bytes"], r["loaded_bytes"] / nbytes),
        ("RSS increase after reading every weight", r["touched"]["VmRSS"] - base,
         (r["touched"]["VmRSS"] - base) / nbytes),
        ("  of which anonymous", r["touched"]["RssAnon"] - before["RssAnon"],
         (r["touched"]["RssAnon"] - before["RssAnon"]) / nbytes),
        ("  of which file-backed (mmap)", r["touched"]["RssFile"] - before["RssFile"],
         (r["touched"]["RssFile"] - before["RssFile"]) / nbytes),
    ]
    print(f"\nload_model(cpu, {args.dtype}) in a fresh process: {r['seconds']:.2f} s, {r['samples']} RSS samples "
          f"every {args.interval_ms:g} ms\n")
    w = max(len(name) for name, _, _ in rows)
    print(f"{'':{w}}  {'MiB':>8}  {'x weights':>9}")
    for name, value, ratio in rows:
        print(f"{name:{w}}  {value / MIB:8.1f}  {'' if ratio is None else f'{ratio:9.2f}'}")
    worst = max(peak["VmRSS"] - base, hwm_inc) / nbytes
    print(f"\npeak / weights = {worst:.2f}x (target <= 1.3x: {'met' if worst <= 1.3 else 'NOT met'})")
    n_maps, map_size = r["mappings"]
    print(f"after loading, the process still maps the checkpoint files {n_maps} times "
          f"({map_size / MIB:.0f} MiB of address space): the weights are "
          + ("backed by the files' pages (paged in lazily)" if n_maps else "private copies"))
    same = r["checksum"] == digest if args.dtype == "float32" else None
    if same is None:
        print("checksum not compared (loaded in a lower precision)")
    else:
        print(f"checksum of loaded tensors {'matches' if same else 'DIFFERS FROM'} the saved ones "
              f"(sha256 {r['checksum'][:16]}...)")
    print(f"temporary folder {folder} removed: {not folder.exists()}")


if __name__ == "__main__":
    main()
