"""Which VAE decoder turns a model's tokens into the best images? Paired benchmark scores.

    python research/decoders.py VAE_DIR [VAE_DIR ...] [--model DIR] [--per-category 40]

Runs `nextstep eval shapes` and `nextstep eval edits` (same prompts, same seeds) once
with the model's own VAE and once with each VAE given. Every VAE must share the
model's encoder and latent scaling (a decoder fine-tuned with `freeze_encoder`), so
the model samples exactly the same tokens every time and only the decoding differs:
the differences are paired, free of the run-to-run noise of the benchmark itself.
Measured on the v2 shapes model (seed 0, batch 16): its own decoder 0.321 overall
(single_object 0.575, colors 0.481), edits 0.122; the decoder of
`recipes/shapes/vae-decoder.toml` 0.454 (single_object 0.875, colors 0.644), edits 0.147.
"""

from __future__ import annotations

import argparse

import torch

from nextstep import NextStepPipeline
from nextstep.shapes.benchmark import run_edits_benchmark, run_shapes_benchmark
from nextstep.training.blend import check_same_latents
from nextstep.vae import AutoencoderKL


def scores(pipe: NextStepPipeline, per_category: int) -> dict[str, float]:
    shapes = run_shapes_benchmark(pipe, per_category)
    edits = run_edits_benchmark(pipe, per_category)
    out = {name: c["score"] for name, c in shapes["categories"].items()}
    out["overall"] = shapes["overall"]
    out["edits"] = edits["overall"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vaes", nargs="+", help="VAE folders sharing the model's encoder")
    p.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    p.add_argument("--per-category", type=int, default=40, help="prompts per category and edits per kind")
    args = p.parse_args()
    pipe = NextStepPipeline.from_pretrained(args.model)
    own = pipe.vae
    rows = {"model's own": scores(pipe, args.per_category)}
    for folder in args.vaes:
        vae = AutoencoderKL.from_pretrained(folder, device=pipe.device, dtype=torch.float32,
                                            family=pipe.model.config.family)
        check_same_latents(own, vae)
        pipe.vae = vae
        rows[folder] = scores(pipe, args.per_category)
    names = list(next(iter(rows.values())))
    width = max(len(r) for r in rows)
    print(f"{'decoder':<{width}}  " + "  ".join(f"{n[:13]:>13}" for n in names))
    base = rows["model's own"]
    for r, s in rows.items():
        print(f"{r:<{width}}  " + "  ".join(f"{s[n]:>6.3f} ({s[n] - base[n]:+.3f})" for n in names))


if __name__ == "__main__":
    main()
