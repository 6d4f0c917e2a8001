"""Where does a shapes-world model take an object's colour from: the caption, or the tokens before it?

    python research/colour_source.py [--model DIR] [--images N] [--repeats R]

For N rendered `colors` scenes ("a COLOUR SHAPE"), the model reads the caption and
then, teacher-forced, the image tokens before the object's first token (raster
order), taken from one of three images:
- the true image;
- the same scene without the object ("blank");
- the same scene with the object in another colour ("recoloured").
It then samples the object's first token R times at the model's default settings.
A sample's colour is that of the nearest of the six encodings of the true scene
with the object in each palette colour, at that token. (Decoding the token alone
does not tell: the decoder draws an object's colour from its neighbours too.)
The script prints how often the colour is the caption's, and for the recoloured
prefix how often it is the prefix's.

The VAE's receptive field spreads an object's colour into the tokens before it.
So a model can learn to copy the colour from those tokens and ignore the caption.
Sampling would then commit to a colour wherever the first such trace is drawn.

Measured with the defaults (213 scenes with something before the object, 3 samples each),
bf16-mixed. The share of samples with the caption's colour, and for the recoloured prefix
also the share with the prefix's colour. Chance is 17%.

| model | true prefix | blank prefix | recoloured prefix | recoloured: prefix's colour |
|---|---|---|---|---|
| v4 (0.7 x stage 7 + 0.3 x stage 8) | 97% | 12% | 6% | 77% |
| stage 10 (trained with context noise) | 80% | 20% | 42% | 6% |
| v5 (stage 11, trained with context noise) | 83% | 16% | 45% | 8% |

v4 copied the colour from the tokens before the object and ignored the caption; the models
trained with context noise read the caption.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from nextstep.devices import autocast
from nextstep.io.images import pil_to_pixels
from nextstep.pipeline import NextStepPipeline
from nextstep.sampling import FlowSampler
from nextstep.shapes import COLOURS, render_image, sample_scene

CELL = 16  # pixels per image token side (f8 VAE, 2x2 patches)
NAMES = list(COLOURS)


def first_token(bbox: tuple[int, int, int, int], grid: int) -> int:
    """Raster index of the first token cell that the box (x0, y0, x1, y1) overlaps."""
    x0, y0, x1, y1 = bbox
    for r in range(grid):
        for c in range(grid):
            if c * CELL < x1 and (c + 1) * CELL > x0 and r * CELL < y1 and (r + 1) * CELL > y0:
                return r * grid + c
    raise ValueError(f"box {bbox} is off the canvas")


def encode_tokens(pipe: NextStepPipeline, scenes: list, grid: int, use_norm: bool) -> torch.Tensor:
    """(len(scenes), grid * grid, token_dim) tokens of the rendered scenes, as the model reads them."""
    pixels = torch.stack([pil_to_pixels(render_image(sc)) for sc in scenes])
    tokens = pipe.model.image_tokens(pipe.vae.to_latents(pixels, sample=False)).reshape(len(scenes), grid * grid, -1)
    return F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6) if use_norm else tokens


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--repeats", type=int, default=3, help="samples of the object's first token per scene")
    args = ap.parse_args()
    torch.manual_seed(0)
    pipe = NextStepPipeline.from_pretrained(args.model)
    model = pipe.model
    s = pipe.settings
    size = s.hw[0]
    grid = size // CELL

    scenes, captions, firsts, colours, other = [], [], [], [], []
    for i in range(args.images):
        scene, caption = sample_scene(np.random.default_rng([77, i]), size, "colors")
        f = first_token(scene.objects[0].bbox, grid)
        if f == 0:
            continue  # nothing before the object
        scenes.append(scene)
        captions.append(str(caption))
        firsts.append(f)
        colours.append(NAMES.index(scene.objects[0].colour))
        other.append((colours[-1] + 1 + i % (len(NAMES) - 1)) % len(NAMES))
    n = len(scenes)
    prefixes = {  # read in reverse, blank first
        "true": scenes,
        "recoloured": [replace(sc, objects=(replace(sc.objects[0], colour=NAMES[o]),))
                       for sc, o in zip(scenes, other)],
        "blank": [replace(sc, objects=()) for sc in scenes],
    }
    request = pipe.prepare(captions, None, 1, 0, s)  # rows: cond, then uncond (cfg > 1)
    groups, rows = request.groups, request.input_ids.shape[0]
    sampler = FlowSampler(s.sampler or "euler_maruyama", s.num_sampling_steps, s.timesteps_shift)
    index = torch.arange(n)
    first = torch.tensor(firsts)
    generator = torch.Generator().manual_seed(0)
    with autocast(pipe.device, pipe.autocast_dtype):
        prepared = sampler.prepare(model.image_head.net, pipe.device)
        # the object's first token in each palette colour: (n, colours, token_dim)
        palette_tokens = torch.stack([
            encode_tokens(pipe, [replace(sc, objects=(replace(sc.objects[0], colour=name),)) for sc in scenes],
                          grid, s.use_norm)[index, first] for name in NAMES], 1).float()
        for name, images in prefixes.items():
            tokens = encode_tokens(pipe, images, grid, s.use_norm)
            embeds = model.embed(request.input_ids)
            T = embeds.shape[1]
            image = model.image_in_projector(tokens[:, :-1].to(embeds.dtype)).to(embeds.dtype).repeat(groups, 1, 1)
            key_valid = torch.cat([request.attention_mask.bool(), torch.ones(rows, grid * grid - 1, dtype=torch.bool)], 1)
            hidden = model.hidden_states(torch.cat([embeds, image], 1), torch.arange(key_valid.shape[1]), key_valid)
            # hidden[T - 1 + k] conditions image token k
            c = model.image_out_projector(hidden[torch.arange(rows), T - 1 + first.repeat(groups)])
            caption = prefix = 0
            for _ in range(args.repeats):
                noise = torch.randn((sampler.noise_draws, n, tokens.shape[-1]), generator=generator)
                out = prepared.sample(c, noise, groups, s.cfg, 1.0).float()
                if s.use_norm:
                    out = F.layer_norm(out, out.shape[-1:], eps=1e-6)
                got = (palette_tokens - out[:, None]).norm(dim=-1).argmin(1)
                caption += int((got == torch.tensor(colours)).sum())
                prefix += int((got == torch.tensor(other)).sum())
            total = n * args.repeats
            line = f"{name:>10} prefix: caption's colour {caption / total:.0%}"
            if name == "recoloured":
                line += f", the prefix's colour {prefix / total:.0%}"
            print(f"{line}  ({total} samples)")


if __name__ == "__main__":
    main()
