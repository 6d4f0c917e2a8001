"""Growing a trained model deeper without changing what it computes (block expansion).

`python -m nextstep.training.grow EXPORT OUT [--every 1]` writes a copy of the model folder
EXPORT to OUT with a new decoder layer after every `--every` of its layers. A new layer is a copy
of the layer before it with its two output projections (attention's `o_proj`, the MLP's
`down_proj`) set to zero, so it adds nothing to the residual stream: the grown model computes
exactly what EXPORT does, and a stage that continues it (`init_from = OUT`) starts from the
trained model's function with more layers to learn with (LLaMA Pro's block expansion). The new
output projections get gradients from the first step (their inputs are not zero); the rest of a
new layer learns once they have left zero.
"""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path

import torch

from ..io import load_model
from ..io.checkpoint import save_model
from ..model import NextStep


def grow(model: NextStep, every: int = 1) -> NextStep:
    """`model` with an output-silenced copy of layer i inserted after each layer i with (i + 1) % every == 0."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    layers = []
    for i, layer in enumerate(model.layers):
        layers.append(layer)
        if (i + 1) % every == 0:
            new = copy.deepcopy(layer)
            with torch.no_grad():
                new.self_attn.o_proj.weight.zero_()
                new.mlp.down_proj.weight.zero_()
                for bias in (new.self_attn.o_proj.bias, new.mlp.down_proj.bias):
                    if bias is not None:
                        bias.zero_()
            layers.append(new)
    grown = copy.deepcopy(model)
    grown.layers = torch.nn.ModuleList(layers)
    grown.config = copy.deepcopy(model.config)
    grown.config.num_hidden_layers = len(layers)
    return grown


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path, help="a model folder (official layout)")
    p.add_argument("out", type=Path, help="the grown model's folder (must not exist)")
    p.add_argument("--every", type=int, default=1, help="a new layer after every N layers (default 1: doubles the depth)")
    args = p.parse_args(argv)
    if args.out.exists():
        p.error(f"{args.out} exists; choose a new folder")
    model = load_model(args.export, torch.device("cpu"), torch.float32)
    grown = grow(model, args.every)
    tmp = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    def model_weights(folder: str, names: list[str]) -> list[str]:  # the model's own, not the VAE's
        top = Path(folder) == args.export
        return [n for n in names if top and (n.endswith(".safetensors") or n.endswith(".safetensors.index.json"))]

    shutil.copytree(args.export, tmp, ignore=model_weights)
    save_model(grown, tmp)
    tmp.rename(args.out)  # the folder appears whole or not at all
    print(f"{args.export}: {model.config.num_hidden_layers} layers -> {args.out}: {grown.config.num_hidden_layers}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
