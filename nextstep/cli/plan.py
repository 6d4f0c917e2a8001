"""`nextstep plan`: how much GPU memory generation needs, from a config alone (nextstep/plan.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..plan import PLAN_SIZE, PRESETS, PROMPT_TOKENS
from ..quantize import MODES
from ..settings import GenerationSettings
from .common import size_arg

DESCRIPTION = """\
Build the model on the meta device (no weights are read, or needed) and print
the memory of text-to-image generation on a GPU: weights per part, the KV
cache, the activations of the prefill, of a decode step with the flow head,
and of the VAE decode, the peak, and which common cards hold it."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="plan the GPU memory of generation, without the weights",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR|CONFIG|PRESET|HUB_ID",
                   help=f"a model folder, a config.json, a preset ({', '.join(PRESETS)}), or a Hub id "
                        f"(only its config.json is fetched)")
    p.add_argument("--revision", default=None, help="with a Hub id: branch, tag or commit")
    p.add_argument("--quantize", choices=MODES, default=None, help="weight-only quantization of the decoder")
    p.add_argument("--dtype", default=None, help="weights dtype (default: bfloat16, the GPU default)")
    p.add_argument("--size", type=size_arg, default=(PLAN_SIZE, PLAN_SIZE), help=f"S or WxH (default {PLAN_SIZE})")
    p.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    defaults = GenerationSettings()
    p.add_argument("--cfg", type=float, default=defaults.cfg, help=f"text guidance (default {defaults.cfg:g})")
    p.add_argument("--steps", type=int, default=defaults.num_sampling_steps,
                   help=f"flow steps per token (default {defaults.num_sampling_steps})")
    p.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS,
                   help=f"length of a prompt row in tokens (default {PROMPT_TOKENS})")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object (sizes in bytes)")
    p.set_defaults(run=run)


def read_configs(name: str, revision: str | None) -> tuple[Any, Any, str]:
    """(NextStepConfig, VAEConfig, label) of a folder, a config.json, a preset or a Hub id."""
    from ..config import NextStepConfig
    from ..errors import ConfigError
    from ..hub import HubOptions, is_hub_id, resolve_model_dir
    from ..plan import preset
    from ..vae.config import VAEConfig

    path = Path(name)
    if not path.exists():
        config = preset(name)
        if config is not None:
            return config, VAEConfig.from_dict({}, config.family), f"{name} (preset)"
        if not is_hub_id(name):
            raise ConfigError(f"--model {name}: no such folder or file, and not a preset ({', '.join(PRESETS)}) "
                              f"or a Hub id")
        path, _ = resolve_model_dir(name, HubOptions(revision=revision), files=("config.json", "vae/config.json"))
    config = NextStepConfig.from_pretrained(path)
    vae_dir = path / (config.vae_name_or_path or "vae") if path.is_dir() else None
    if vae_dir is not None and (vae_dir / "config.json").is_file():
        vae = VAEConfig.from_pretrained(vae_dir, config.family)
    else:
        vae = VAEConfig.from_dict({}, config.family)  # the f8ch16 tokenizer's architecture
    return config, vae, name


def run(args: argparse.Namespace) -> int:
    import torch

    from ..devices import resolve
    from ..plan import format_plan, plan_memory

    config, vae, label = read_configs(args.model, args.revision)
    _, dtype, _ = resolve(torch.device("cuda"), args.dtype)
    plan = plan_memory(config, vae, height=args.size[0], width=args.size[1], batch=args.batch, cfg=args.cfg,
                       steps=args.steps, dtype=dtype, quantize=args.quantize, prompt_tokens=args.prompt_tokens,
                       name=label)
    print(json.dumps(plan.to_dict()) if args.json else format_plan(plan))
    return 0
