"""`benchmarks/load_memory.py --quantize MODE`: peak RSS of load + generate, bf16 against MODE (CPU).

The parent writes a random ~1B-parameter bf16 checkpoint in the official layout
into a temporary folder, without ever holding the model (tensor by tensor, one
shard at a time), then runs two fresh processes that each load it with
`NextStepPipeline.from_pretrained(dtype="bfloat16")`, with and without
`quantize=MODE`, and generate one image. Each child samples its RSS from a
background thread and reads VmHWM; both absolute peaks and their ratio are
printed, with the peak increase over the child's RSS after its imports.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from load_memory import MIB, Sampler, proc_status

SHIPPED = Path(__file__).resolve().parents[1] / "nextstep" / "assets" / "shapes"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# About 1.05B parameters, 86% of them in the decoder's linear layers and 13% in the embeddings and
# LM head: close to NextStep-1-Large's split (89% / 10.5%), so int8 saves about what it saves there.
SHAPE = {"hidden": 2048, "layers": 20, "intermediate": 5632, "vocab": 32000}
TARGET_RATIO = 0.6
GIB = 2**30


def shipped_scaled(hidden: int, layers: int, intermediate: int, vocab: int):
    """The shipped model's config (its tokenizer's ids) with a larger decoder and flow head."""
    from nextstep import NextStepConfig

    shipped = json.loads((SHIPPED / "config.json").read_text())
    return NextStepConfig.from_dict({
        **shipped, "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": intermediate,
        "num_attention_heads": hidden // 128, "num_key_value_heads": max(hidden // 512, 1), "head_dim": 128,
        "vocab_size": vocab, "fm_head_dim": 512, "fm_head_layers": 6, "torch_dtype": "bfloat16"})


def write_checkpoint(folder: Path, config, shard_bytes: int, device: str = "cpu") -> tuple[int, int]:
    """Random bf16 weights for `config` in the official layout, with the shipped model's tokenizer
    files and VAE; returns (parameters, bytes). Tensors are drawn on `device` (a GPU draws 14B
    numbers in seconds) and written one shard at a time."""
    from safetensors.torch import save_file

    from nextstep import NextStep

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in NextStep(config).state_dict().items() if k != "gen_pos_embed"}
    g = torch.Generator(device).manual_seed(0)
    weight_map, shard, size, n_params, total = {}, {}, 0, 0, 0
    names: list[str] = []

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(names) + 1:05d}.safetensors"  # renamed once the count is known
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for key, shape in shapes.items():
        # Norm gains of 1 and small random matrices keep activations finite through 20 layers.
        t = (torch.ones(shape, device=device) if key.endswith("norm.weight")
             else torch.randn(shape, generator=g, device=device) * 0.02)
        t = t.to(torch.bfloat16).cpu()
        if shard and size + t.numel() * 2 > shard_bytes:
            flush()
        shard[key] = t
        size += t.numel() * 2
        n_params += t.numel()
        total += t.numel() * 2
    flush()
    final = {old: f"model-{i:05d}-of-{len(names):05d}.safetensors" for i, old in enumerate(names, 1)}
    for old, new in final.items():
        (folder / old).rename(folder / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    for name in TOKENIZER_FILES:
        shutil.copy(SHIPPED / name, folder / name)
    shutil.copytree(SHIPPED / "vae", folder / "vae")
    return n_params, total


def generate_child(folder: Path, interval: float, quantize: str | None) -> None:
    """Load the folder in bf16 (quantized with `quantize` unless "none") and make one 64x64 image."""
    from nextstep import NextStepPipeline
    from nextstep.quantize import weight_bytes

    mode = None if quantize in (None, "none") else quantize
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = proc_status()
    sampler = Sampler(interval)
    sampler.start()
    t0 = time.perf_counter()
    pipe = NextStepPipeline.from_pretrained(folder, device="cpu", dtype="bfloat16", quantize=mode)
    t1 = time.perf_counter()
    after_load = proc_status()
    image = pipe("a red circle", height=64, width=64, num_inference_steps=4, guidance_scale=3.0,
                 generator=0).images[0]
    t2 = time.perf_counter()
    sampler.stop.set()
    sampler.join()
    end = proc_status()
    print(json.dumps({"before": before, "peak_sampled": sampler.peak["VmRSS"], "hwm": end["VmHWM"],
                      "after_load": after_load, "end": end, "load_s": t1 - t0, "generate_s": t2 - t1,
                      "weights": weight_bytes(pipe.model), "image": list(image.size)}))


def run_child(folder: Path, interval_ms: float, mode: str) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("load_memory.py")), "--generate-child",
                           str(folder), "--interval-ms", str(interval_ms), "--quantize", mode],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{mode} child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(args) -> None:
    dims = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in SHAPE.items()}
    folder = Path(tempfile.mkdtemp(prefix="nextstep-quant-bench-", dir=args.tmpdir))
    try:
        t0 = time.perf_counter()
        n_params, nbytes = write_checkpoint(folder, shipped_scaled(**dims), shard_bytes=max(args.shard_mib, 1024) * MIB)
        shards = len(list(folder.glob("model-*.safetensors")))
        print(f"torch {torch.__version__}; random checkpoint {dims}: {n_params / 1e9:.2f}B params, "
              f"{nbytes / GIB:.2f} GiB bf16 in {shards} shards, official layout "
              f"(written in {time.perf_counter() - t0:.0f} s)")
        results = {mode: run_child(folder, args.interval_ms, mode) for mode in ("none", args.quantize)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    def peak(r: dict) -> int:
        return max(r["peak_sampled"], r["hwm"])

    print(f"\nfresh process each; from_pretrained(device='cpu', dtype='bfloat16'[, quantize]) + one 64x64 image "
          f"(4 steps, cfg 3)\n")
    w = 34
    print(f"{'':{w}}  {'bf16':>9}  {args.quantize:>9}  {'ratio':>6}")
    rows = [
        ("peak RSS (MiB)", peak),
        ("  RSS after imports (MiB)", lambda r: r["before"]["VmRSS"]),
        ("  peak increase over it (MiB)", lambda r: peak(r) - r["before"]["VmRSS"]),
        ("RSS after loading (MiB)", lambda r: r["after_load"]["VmRSS"]),
        ("weights in memory (MiB)", lambda r: r["weights"]["total"]),
        ("  decoder linears (MiB)", lambda r: r["weights"]["decoder_linears"]),
    ]
    base, quant = results["none"], results[args.quantize]
    for name, f in rows:
        print(f"{name:{w}}  {f(base) / MIB:9.1f}  {f(quant) / MIB:9.1f}  {f(quant) / f(base):6.3f}")
    for name in ("load_s", "generate_s"):
        print(f"{name + ' (s)':{w}}  {base[name]:9.1f}  {quant[name]:9.1f}  {quant[name] / base[name]:6.2f}")
    ratio = peak(quant) / peak(base)
    print(f"\npeak RSS {args.quantize} / bf16 = {ratio:.3f} "
          f"(target <= {TARGET_RATIO}: {'met' if ratio <= TARGET_RATIO else 'NOT met'}); "
          f"peak increase over the imports: {(peak(quant) - quant['before']['VmRSS']) / (peak(base) - base['before']['VmRSS']):.3f}")
    print(f"temporary folder {folder} removed: {not folder.exists()}")
