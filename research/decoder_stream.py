"""Which VAE decoder should ship? Paired on the model's own tokens of the training stream.

    python research/decoder_stream.py VAE_DIR [VAE_DIR ...] [--model DIR] [--seeds 1000 2000 3000]

For each seed, the model draws the world stream that `think_default` measures (half captions at the
model's generation defaults, half edits) once; its image tokens are kept and decoded by its own VAE
and by each VAE given, all of which must share its encoder (decoders trained with
`freeze_encoder`), and the checker scores every decoding. The same tokens, so the differences are
paired, and the prompts are training ones, never the benchmark's. Then the ceiling each VAE sets by
itself: the true target of world edits (and of captions on dark backgrounds) encoded and decoded,
judged like a model's output.

Measured 2026-12-04 on v18's tokens (1024 prompts x seeds 1000 / 2000 / 3000), the decoder it
shipped with against `recipes/shapes/vae-dark-decoder.toml` (3000 steps): reward 0.790 -> 0.811,
captions 0.944 -> 0.946, edits 0.637 -> 0.676; round trip of the true edit targets 0.807 -> 0.920
(dark targets 0.60-0.70 before), of dark captions 0.862 -> 0.955 (512 cases, seed 7000).
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import torch

from nextstep import NextStepPipeline
from nextstep.io.images import pil_to_pixels, pixels_to_pil
from nextstep.model import unpatchify
from nextstep.shapes.checker import check, check_edit
from nextstep.shapes.dataset import ShapesConfig, make_sample
from nextstep.shapes.renderer import render_image
from nextstep.training.blend import check_same_latents
from nextstep.training.rewards import shapes_reward
from nextstep.training.think_default import world_stream
from nextstep.vae import AutoencoderKL


def stream_tokens(pipe: NextStepPipeline, prompts: int, seed: int) -> tuple[list[str], list, torch.Tensor]:
    """The world stream's prompts, edit sources (None for captions) and the model's image tokens."""
    captions, cases, sources = world_stream(prompts, seed, 64, 0.3)
    kept: dict[int, torch.Tensor] = {}
    decode = pipe.decode_tokens

    def keep(tokens: torch.Tensor, grid: tuple[int, int]) -> list:
        images = decode(tokens, grid)
        kept.update((id(im), t) for im, t in zip(images, tokens.detach().float()))
        return images

    pipe.decode_tokens = keep
    try:
        images = [g[0] for g in pipe.generate(captions, seeds=list(range(len(captions))))]
        images += [g[0] for g in pipe.generate([c.instruction for c in cases], seeds=list(range(len(cases))),
                                               images=sources)]
    finally:
        pipe.decode_tokens = decode
    return captions + [c.instruction for c in cases], [None] * len(captions) + sources, \
        torch.stack([kept[id(im)] for im in images])


def round_trip(vae: AutoencoderKL, images: list) -> list:
    with torch.inference_mode():
        x = torch.stack([pil_to_pixels(im) for im in images])
        return pixels_to_pil(vae.from_latents(vae.to_latents(x, sample=False)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vaes", nargs="+", help="VAE folders sharing the model's encoder")
    p.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1000, 2000, 3000])
    p.add_argument("--prompts", type=int, default=1024, help="world stream prompts per seed (half edits)")
    p.add_argument("--cases", type=int, default=512, help="true targets for the round trip")
    args = p.parse_args()
    pipe = NextStepPipeline.from_pretrained(args.model)
    vaes = {"model's own": pipe.vae}
    for folder in args.vaes:
        vaes[folder] = AutoencoderKL.from_pretrained(folder, dtype=torch.float32, family=pipe.model.config.family)
        check_same_latents(pipe.vae, vaes[folder])
    patch = pipe.model.config.latent_patch_size
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for seed in args.seeds:
        prompts, sources, tokens = stream_tokens(pipe, args.prompts, seed)
        half = sum(s is None for s in sources)  # captions first, then edits
        side = math.isqrt(tokens.shape[1])  # the shapes world's images are square
        for name, vae in vaes.items():
            with torch.inference_mode():
                images = [im for chunk in tokens.split(64)
                          for im in pixels_to_pil(vae.from_latents(unpatchify(chunk, patch, side, side)))]
            r = shapes_reward(images, prompts, sources)
            for part, xs in (("reward", r), ("captions", r[:half]), ("edits", r[half:])):
                scores[name][part].append(sum(xs) / len(xs))
            print(f"seed {seed}  {name}: reward {scores[name]['reward'][-1]:.4f}  captions "
                  f"{scores[name]['captions'][-1]:.4f}  edits {scores[name]['edits'][-1]:.4f}", flush=True)
    cases = [make_sample(ShapesConfig(size=64, seed=7000, edits=True, dark_prob=0.4), i) for i in range(args.cases)]
    dark = [make_sample(ShapesConfig(size=64, seed=7000, dark_prob=1.0), i) for i in range(args.cases)]
    print(f"\n{'decoder':<40} stream reward  captions  edits  | round trip: edits  dark captions")
    for name, vae in vaes.items():
        edits = round_trip(vae, [render_image(c.scene) for c in cases])
        edit_ok = [check_edit(render_image(c.source), im, c.instruction).passed for c, im in zip(cases, edits)]
        caps = round_trip(vae, [render_image(c.scene) for c in dark])
        cap_ok = [check(im, c.caption).passed for c, im in zip(dark, caps)]
        mean = {k: sum(v) / len(v) for k, v in scores[name].items()}
        print(f"{name:<40} {mean['reward']:.4f}        {mean['captions']:.4f}    {mean['edits']:.4f} | "
              f"{sum(edit_ok) / len(edit_ok):.3f}              {sum(cap_ok) / len(cap_ok):.3f}")


if __name__ == "__main__":
    main()
