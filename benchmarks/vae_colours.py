"""How far apart does a VAE put the shapes world's colours, compared with small moves?

    python benchmarks/vae_colours.py [--vae DIR]

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
"""

from __future__ import annotations

import argparse
import itertools

import torch

from nextstep.data.shapes import COLOURS, Scene, SceneObject, render_image
from nextstep.pipeline import SHIPPED_MODEL, pil_to_pixels
from nextstep.vae import AutoencoderKL

BBOX = (20, 20, 38, 38)  # inside the 2x2 central tokens of a 64 px image at f8 with 2x2 patches


@torch.no_grad()
def object_tokens(vae: AutoencoderKL, shape: str, colour: str, bbox: tuple[int, int, int, int]) -> torch.Tensor:
    image = render_image(Scene(64, "light", (SceneObject(shape, colour, bbox),)))
    z = vae.to_latents(pil_to_pixels(image)[None], sample=False)[0]  # (C, h, w), scaled
    f = 64 // z.shape[-1]  # pixels per latent cell
    lo, hi = 16 // f, 48 // f  # the latent cells under pixels 16..47, which hold the object
    return z[:, lo:hi, lo:hi].flatten(1).T  # (cells, C)


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).norm(dim=1).mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default=str(SHIPPED_MODEL / "vae"))
    args = p.parse_args()
    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(args.vae)
    colours = list(COLOURS)
    tokens = {c: object_tokens(vae, "circle", c, BBOX) for c in colours}
    print(f"VAE {args.vae}: mean distance between the object's latent cells")
    print(" " * 8 + " ".join(f"{c:>7s}" for c in colours))
    for a in colours:
        print(f"{a:>7s} " + " ".join(f"{distance(tokens[a], tokens[b]):7.2f}" for b in colours))
    closest = min(distance(tokens[a], tokens[b]) for a, b in itertools.combinations(colours, 2))
    moved = distance(tokens["red"], object_tokens(vae, "circle", "red", (22, 20, 40, 38)))
    square = distance(tokens["red"], object_tokens(vae, "square", "red", BBOX))
    print(f"closest two colours {closest:.2f}; red circle moved 2 px {moved:.2f}; made a square {square:.2f}")
    print(f"closest colours / 2 px move: {closest / moved:.2f} (below 1: colour matters less than a small move)")


if __name__ == "__main__":
    main()
