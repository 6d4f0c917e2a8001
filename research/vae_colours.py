"""How far apart does a VAE put the shapes world's colours, compared with small moves?

    python research/vae_colours.py [--vae DIR] [--cases N]

The model learns image tokens with an MSE loss, so what the latent space keeps
close together is what the model confuses. This renders one 18 px circle in each
palette colour at the same place, encodes each image (posterior mean, scaled as
the model sees it) and prints the mean distance between the object's tokens for
every pair of colours, next to the distance that moving the red circle by 2 px,
or making it a square, causes. Measured (per latent cell of 16 numbers): the
shipped v0 VAE puts its closest two colours 0.84 apart, half the 1.73 of a 2 px
move (ratio 0.49), and its model follows shapes far better than colours. An f4
variant scored 0.38 and one without `encoder_norm` 0.17: a VAE for this world
should push this ratio well above 1.

The table is printed for both backgrounds. Then the ceiling the VAE sets on the
edits benchmark: each case's true target, encoded (posterior mean) and decoded,
judged like a model's edit. Measured on the shipped v5 VAE (fine-tuned decoder):

| background | closest two colours | red moved 2 px | ratio |
|---|---|---|---|
| light | 0.84 (red-orange) | 1.73 | 0.49 |
| dark | 0.21 (yellow-orange) | 1.29 | 0.16 |

On a dark background the encoder all but merges yellow, orange and red, and the
round trip turns red and yellow objects orange. The true targets pass 95 of the 96
light-target cases but only 31 of the 64 dark-target ones (0.79 overall; 34 / 35 / 34 / 23
of 40 for recolour / add / remove / background). No generator on this latent space
gets those colours right: the VAE, not the generator, is the fix.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from nextstep.io.images import pil_to_pixels, pixels_to_pil
from nextstep.pipeline import SHIPPED_MODEL
from nextstep.shapes import BACKGROUNDS, COLOURS, Scene, SceneObject, check_edit, render_image
from nextstep.shapes.benchmark import benchmark_edit_cases
from nextstep.vae import AutoencoderKL

BBOX = (20, 20, 38, 38)  # inside the 2x2 central tokens of a 64 px image at f8 with 2x2 patches


@torch.no_grad()
def object_tokens(vae: AutoencoderKL, shape: str, colour: str, bbox: tuple[int, int, int, int],
                  background: str = "light") -> torch.Tensor:
    image = render_image(Scene(64, background, (SceneObject(shape, colour, bbox),)))
    z = vae.to_latents(pil_to_pixels(image)[None], sample=False)[0]  # (C, h, w), scaled
    f = 64 // z.shape[-1]  # pixels per latent cell
    lo, hi = 16 // f, 48 // f  # the latent cells under pixels 16..47, which hold the object
    return z[:, lo:hi, lo:hi].flatten(1).T  # (cells, C)


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).norm(dim=1).mean().item()


def colour_table(vae: AutoencoderKL, background: str) -> None:
    colours = list(COLOURS)
    tokens = {c: object_tokens(vae, "circle", c, BBOX, background) for c in colours}
    print(f"{background} background: mean distance between the object's latent cells")
    print(" " * 8 + " ".join(f"{c:>7s}" for c in colours))
    for a in colours:
        print(f"{a:>7s} " + " ".join(f"{distance(tokens[a], tokens[b]):7.2f}" for b in colours))
    closest = min(distance(tokens[a], tokens[b]) for a, b in itertools.combinations(colours, 2))
    moved = distance(tokens["red"], object_tokens(vae, "circle", "red", (22, 20, 40, 38), background))
    square = distance(tokens["red"], object_tokens(vae, "square", "red", BBOX, background))
    print(f"closest two colours {closest:.2f}; red circle moved 2 px {moved:.2f}; made a square {square:.2f}")
    print(f"closest colours / 2 px move: {closest / moved:.2f} (below 1: colour matters less than a small move)\n")


@torch.no_grad()
def edits_ceiling(vae: AutoencoderKL, per_kind: int) -> None:
    """The edits benchmark judged on its true targets after a VAE round trip."""
    print(f"edits benchmark, true targets after an encode-decode round trip ({per_kind} cases per kind):")
    passed, total = 0, 0
    for kind, cases in benchmark_edit_cases(per_kind, 0, 64).items():
        targets = torch.stack([pil_to_pixels(render_image(c.target)) for c in cases])
        decoded = pixels_to_pil(vae.from_latents(vae.to_latents(targets, sample=False)))
        by_background = {b: [0, 0] for b in BACKGROUNDS}
        for case, image in zip(cases, decoded):
            ok = check_edit(render_image(case.source), image, case.instruction).passed
            by_background[case.target.background][0] += ok
            by_background[case.target.background][1] += 1
        n = sum(v[0] for v in by_background.values())
        passed, total = passed + n, total + len(cases)
        split = ", ".join(f"{b} target {k}/{m}" for b, (k, m) in by_background.items() if m)
        print(f"  {kind:<10s} {n}/{len(cases)} ({split})")
    print(f"  overall {passed / total:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default=str(SHIPPED_MODEL / "vae"))
    p.add_argument("--cases", type=int, default=40, help="edit cases per kind for the round trip (default 40)")
    args = p.parse_args()
    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(args.vae)
    print(f"VAE {args.vae}\n")
    for background in BACKGROUNDS:
        colour_table(vae, background)
    edits_ceiling(vae, args.cases)


if __name__ == "__main__":
    main()
