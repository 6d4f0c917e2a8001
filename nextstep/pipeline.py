"""NextStepPipeline: captions (and source images) in, PIL images out.

    pipe = NextStepPipeline.from_pretrained()                  # the shipped shapes model
    images = pipe("a red circle", num_images_per_prompt=4, generator=7).images

How an image is sampled is a `GenerationSettings` (nextstep/settings.py): the
pipeline holds the model's defaults in `pipe.settings`, and every call may
override them. Image k of a prompt with seed s is the image of seed s + k,
in `pipe(...)`, the CLI, the server and the benchmarks alike (`generate`).
`generate_image` keeps the official signature and sampling order, so scripts
written for the official pipeline port by changing one import (see
docs/differences.md for where we do the right thing or raise instead).

Prompts are plain text in `pipe(...)` and `generate` (what the CLI, the server
and the benchmarks call): a prompt that spells a special token or `<image>`
gets ordinary text tokens, and an edit's source image goes where
`settings.source_image` says. `generate_image` reads captions as markup, as
the official code does.

With `think=True` (a setting) the model first writes a thought with its LM head
and then draws the image from caption + thought (self-CoT, docs/self-cot.md);
`pipe(...).texts` holds the thoughts. `generate_text` continues plain text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from .config import FAMILIES
from .devices import autocast, resolve
from .errors import CheckpointError
from .hub import HubOptions, resolve_model_dir, resolve_vae_dir
from .io import load_model, save_model
from .io.atomic import atomic_write
from .io.images import pixels_to_pil
from .model import NextStep, unpatchify
from .sampling.autoregressive import generate_tokens
from .sampling.compiled import CompiledLoop, compile_default
from .sampling.requests import GenerationRequest, merge_requests
from .settings import (DEFAULT_SEED, GENERATION_DEFAULTS_FILE, SEED_MODULUS, GenerationSettings,
                       read_generation_defaults)
from .text import TextTokenizer, with_image_tag
from .thinking import TextWriter
from .vae import AutoencoderKL

DECODE_CHUNK = 8  # images per VAE decoder call (see decode_pixels)
BATCH_IMAGES = 64  # images per model call in `generate`, unless told

# The small shapes-world model that ships inside the package (official layout).
SHIPPED_MODEL = Path(__file__).resolve().parent / "assets" / "shapes"


def seed_from(generator: torch.Generator | int | None) -> int:
    """The seed of a diffusers-style `generator`: an int, a torch.Generator's `initial_seed()`, or
    for None a fresh one from torch's global RNG (so `torch.manual_seed` makes it repeatable)."""
    if isinstance(generator, torch.Generator):
        return generator.initial_seed() % SEED_MODULUS
    if isinstance(generator, int) and not isinstance(generator, bool):
        if not 0 <= generator < SEED_MODULUS:
            raise ValueError(f"seed must be between 0 and {SEED_MODULUS - 1}, got {generator}")
        return generator
    if generator is None:
        return int(torch.randint(0, 2**31 - 1, ()).item())
    raise TypeError(f"generator must be a torch.Generator, an int or None, got {type(generator).__name__}")


@dataclass
class NextStepPipelineOutput:
    """What `pipe(...)` returns, like a diffusers pipeline output."""

    images: list[Image.Image]
    texts: list[str]  # the thought of each image (think=True), else "" for each


class NextStepPipeline(TextWriter):
    def __init__(self, model: NextStep, vae: AutoencoderKL, tokenizer: TextTokenizer,
                 generation_defaults: dict[str, Any] | None = None, autocast_dtype: torch.dtype | None = None,
                 compile: bool | None = None) -> None:
        super().__init__(model, vae, tokenizer)
        self.autocast_dtype = autocast_dtype  # matmuls in this dtype during token sampling (None: the weights')
        # The decode step and the flow head's integration compiled (CUDA graphs on a GPU), reused by
        # every call; None: the device's default (compiled on CUDA, eager on the CPU: see the README).
        device = model.embed_tokens.weight.device
        self.compiled = CompiledLoop(device) if compile_default(device, compile) else None
        # Kept apart so that save_pretrained writes back exactly what the folder said.
        self._folder_defaults = dict(generation_defaults or {})
        size = model.config.latent_size * vae.down_factor
        own = GenerationSettings(hw=(size, size), sampler=FAMILIES[model.config.family].default_sampler)
        folder = {k: v for k, v in self._folder_defaults.items() if k != "cpu_dtype"}
        self.settings: GenerationSettings = own.with_overrides(**folder)  # the model's defaults

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) that `pipe(...)` and the CLI generate when not told: the model's own."""
        return self.settings.hw

    def edit_prompt(self, instruction: str, settings: GenerationSettings | None = None) -> str:
        """A markup edit caption (for `generate_image`): the instruction with its `<image>` slot where
        this model was trained to see it. `pipe(...)` and `generate` place the source themselves."""
        return with_image_tag(instruction, (settings or self.settings).source_image)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_dir: str | Path | None = None, vae_dir: str | Path | None = None,
                        device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, *,
                        quantize: str | None = None,
                        compile: bool | None = None,
                        revision: str | None = None,
                        cache_dir: str | Path | None = None,
                        local_files_only: bool = False,
                        strict_config: bool = False) -> "NextStepPipeline":
        """Load a model folder (official layout) or a Hugging Face Hub id ("org/name"; `revision`,
        `cache_dir`, `local_files_only` and $HF_HUB_OFFLINE say how, see nextstep/hub.py); without
        one, the shipped shapes-world model. The VAE comes from `vae_dir` (a folder or a Hub id),
        else from the config's `vae_name_or_path` (relative to the model folder, or a Hub id), else
        from `<model_dir>/vae`. Config fields nextstep does not know are warned about, or refused
        with `strict_config=True`. An optional `generation_defaults.json` in the
        folder sets the model's generation defaults, and may ask for "bf16-mixed" on CPUs
        (`cpu_dtype`; `dtype` overrides it). `quantize` ("int8", "int4", "fp8") stores the decoder
        layers' linear weights quantized (nextstep/quantize.py; torchao on GPUs). `compile` runs the
        decode step and the flow head compiled (CUDA graphs on a GPU); None: the device's default."""
        if model_dir is None:
            if not SHIPPED_MODEL.is_dir():
                raise CheckpointError(f"the shipped model is not installed at {SHIPPED_MODEL}; "
                                      f"pass a model folder instead")
            model_dir = SHIPPED_MODEL
        hub = HubOptions(revision, cache_dir, local_files_only)
        model_dir, repo_id = resolve_model_dir(model_dir, hub)
        settings, load = read_generation_defaults(model_dir)
        device, dtype, autocast_dtype = resolve(device, dtype, load.get("cpu_dtype"))
        model = load_model(model_dir, device, dtype, strict_config=strict_config, quantize=quantize)
        tokenizer = TextTokenizer.from_pretrained(model_dir)
        vae_dir = resolve_vae_dir(vae_dir, model_dir, model.config.vae_name_or_path, repo_id, hub)
        # The VAE stays in fp32: it is small and decoding is where precision shows.
        vae = AutoencoderKL.from_pretrained(vae_dir, device=device, dtype=torch.float32, family=model.config.family)
        return cls(model, vae, tokenizer, {**settings, **load}, autocast_dtype, compile=compile)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the official layout: config, safetensors, tokenizer files, and the VAE in `vae/`."""
        folder = Path(folder)
        save_model(self.model, folder, config_updates={"vae_name_or_path": "vae"})
        self.tokenizer.save_pretrained(folder)
        self.vae.save_pretrained(folder / "vae")
        if self._folder_defaults:
            text = json.dumps(self._folder_defaults, indent=2) + "\n"
            atomic_write(folder / GENERATION_DEFAULTS_FILE, lambda tmp: Path(tmp).write_text(text))

    # ------------------------------------------------------------------ generation
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | int | None = None,
        image: Image.Image | Sequence[Image.Image] | None = None,
        image_guidance_scale: float | None = None,
        **settings: Any,
    ) -> NextStepPipelineOutput:
        """Diffusers-style call. Unset arguments come from `pipe.settings`; any other
        `GenerationSettings` field may be given by name (e.g. `timesteps_shift=2.0`). Image k of
        every prompt is the image of seed `seed_from(generator) + k` (a torch.Generator counts by
        its `initial_seed()`, not its state). `image` makes it an edit: one image serves every
        prompt or there is one per prompt, and the size defaults to the source image's. `think=`
        says whether this call's images think, whichever their kind (with `image`, it sets
        `think_edits`)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if image is None and image_guidance_scale not in (None, 1):
            raise ValueError("image_guidance_scale guides by a source image: pass image= (editing)")
        images = None
        if image is not None:
            images = [image] if isinstance(image, Image.Image) else list(image)
            images = images * len(prompts) if len(images) == 1 else images
            if "think" in settings:
                settings["think_edits"] = settings.pop("think")
        s = self.settings.with_overrides(negative_prompt=negative_prompt, num_sampling_steps=num_inference_steps,
                                         cfg=guidance_scale, cfg_img=image_guidance_scale, **settings)
        h, w = s.hw
        if images and isinstance(images[0], Image.Image) and "hw" not in settings:
            h, w = images[0].height, images[0].width
        s = s.with_overrides(hw=(height or h, width or w))
        seed = seed_from(generator)
        out: list[tuple[list[Image.Image], list[str]]] = [([], [])] * len(prompts)
        for i, group, thoughts in self.iter_generate(prompts, s, [seed] * len(prompts), num_images_per_prompt,
                                                     images):
            out[i] = (group, thoughts)
        return NextStepPipelineOutput([im for group, _ in out for im in group], [t for _, ts in out for t in ts])

    def generate(self, prompts: Sequence[str], settings: GenerationSettings | None = None,
                 seeds: Sequence[int] | None = None, n: int = 1, images: Sequence[Image.Image] | None = None,
                 batch_images: int = BATCH_IMAGES, progress: bool = False) -> list[list[Image.Image]]:
        """n images for each prompt (with `images`: each prompt edits its source image), image k of
        prompt i being the image of seed `seeds[i] + k`. Returns them grouped per prompt. Prompts are
        plain text; an edit's source image goes where `settings.source_image` says."""
        out: list[list[Image.Image]] = [[] for _ in prompts]
        for i, group, _ in self.iter_generate(prompts, settings, seeds, n, images, batch_images, progress):
            out[i] = group
        return out

    def iter_generate(self, prompts: Sequence[str], settings: GenerationSettings | None = None,
                      seeds: Sequence[int] | None = None, n: int = 1, images: Sequence[Image.Image] | None = None,
                      batch_images: int = BATCH_IMAGES, progress: bool = False,
                      thoughts: Sequence[Sequence[str]] | None = None
                      ) -> Iterator[tuple[int, list[Image.Image], list[str]]]:
        """`generate`, yielding (prompt index, its n images, their n thoughts) as each prompt is done.

        Every image is its own request (its prompt, its seed), and a model call only stacks
        requests whose prompt rows have the same length, so nothing is padded for a neighbour:
        an image is the same whatever else is generated with it, or in what order.
        With `settings.think` (`think_edits` for edits) every image's thought is written first
        (with the image's seed, see nextstep/thinking.py), and the image is drawn from its prompt
        + THOUGHT_OPEN + thought; without, each thought is "". `thoughts` ([prompt][k], where the
        settings think) are drawn after instead of written: a plan of one's own, or thoughts already
        written with `write_thoughts`."""
        s = settings or self.settings
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        # Plain text: users' prompts cannot spell special tokens or place the source image.
        prompts, images = self.check_inputs(prompts, images, n, s, plain=True)
        seeds = [DEFAULT_SEED] * len(prompts) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        if batch_images < 1:
            raise ValueError(f"batch_images must be >= 1, got {batch_images}")
        think = s.thinks(edit=images is not None)
        if thoughts is not None:
            if not think or len(thoughts) != len(prompts) or any(len(t) != n for t in thoughts):
                raise ValueError(f"thoughts: {n} for each of the {len(prompts)} prompts, with settings that "
                                 "think for them")
            thoughts = [list(t) for t in thoughts]
        elif think:
            thoughts = self.write_thoughts(prompts, images, seeds, n, s, batch_images)
        else:
            thoughts = [[""] * n for _ in prompts]
        jobs: dict[int, list[tuple[int, int]]] = {}  # prompt length -> [(prompt, k)], in order
        for i, p in enumerate(prompts):
            for k in range(n):
                thought = thoughts[i][k] if think else None
                if k == 0 or thought is not None:  # without thoughts a prompt's images share one length
                    length = self.prompt_length(p, None if images is None else images[i], s, plain=True,
                                                thought=thought)
                jobs.setdefault(length, []).append((i, k))
        done: dict[int, dict[int, Image.Image]] = {i: {} for i in range(len(prompts))}
        with tqdm(total=len(prompts) * n, unit="image", disable=None if progress else True) as bar:  # None: TTY only
            for same_length in jobs.values():
                for start in range(0, len(same_length), batch_images):
                    batch = same_length[start:start + batch_images]
                    requests = [self.prepare(prompts[i], None if images is None else images[i], 1,
                                             (seeds[i] + k) % SEED_MODULUS, s, plain=True,
                                             thoughts=[thoughts[i][k]] if think else None) for i, k in batch]
                    merged = merge_requests(requests)
                    for (i, k), im in zip(batch, self.decode_tokens(self.sample_tokens(merged), merged.grid)):
                        done[i][k] = im
                        if len(done[i]) == n:
                            yield i, [done[i][j] for j in range(n)], thoughts[i]
                    bar.update(len(batch))

    def generate_image(
        self,
        captions: str | Sequence[str],
        images: Image.Image | Sequence[Image.Image] | None = None,
        num_images_per_caption: int = 1,
        positive_prompt: str | None = None,
        negative_prompt: str | None = None,
        hw: tuple[int, int] | None = None,
        use_norm: bool | None = None,
        cfg: float | None = None,
        cfg_img: float | None = None,
        cfg_schedule: str | None = None,
        timesteps_shift: float | None = None,
        num_sampling_steps: int | None = None,
        seed: int | None = None,
        progress: bool = True,
        sde_type: str | None = None,
        noise_level: float | None = None,
        context_noise_std: float | None = None,
    ) -> list[Image.Image]:
        """The official call: `num_images_per_caption` images per caption (caption-major), all drawn
        in the official order from one generator seeded with `seed`.

        With `images`, every caption must hold exactly one `<image>`, which is replaced by that
        source image (editing). `sde_type` is the sampler. Arguments left unset take the model's
        generation defaults (`pipe.settings`), as `pipe(...)` does.
        """
        request = self.official_request(
            captions, images, num_images_per_caption, seed, sde_type, positive_prompt=positive_prompt,
            negative_prompt=negative_prompt, hw=hw, use_norm=use_norm, cfg=cfg, cfg_img=cfg_img,
            cfg_schedule=cfg_schedule, timesteps_shift=timesteps_shift, num_sampling_steps=num_sampling_steps,
            noise_level=noise_level, context_noise_std=context_noise_std)
        return self.decode_tokens(self.sample_tokens(request, progress=progress), request.grid)

    def official_request(self, captions: str | Sequence[str], images: Any = None, num_images_per_caption: int = 1,
                         seed: int | None = None, sde_type: str | None = None, **settings: Any) -> GenerationRequest:
        """`generate_image`'s arguments (but `progress`) as a prepared request, for tests and tools
        that inspect one. `settings` are `GenerationSettings` fields; None leaves one unset."""
        if images is None and settings.get("cfg_img") not in (None, 1):
            raise ValueError("cfg_img guides by a source image: pass images= (editing) or leave cfg_img=1")
        if settings.get("hw") is not None:
            settings["hw"] = tuple(settings["hw"])
        s = self.settings.with_overrides(sampler=sde_type, **settings)
        return self.prepare(captions, images, num_images_per_caption, DEFAULT_SEED if seed is None else seed, s)

    def sample_tokens(self, request: GenerationRequest, progress: bool = False,
                      trace: dict[str, list[torch.Tensor]] | None = None) -> torch.Tensor:
        """Run the autoregressive loop of a prepared request: (B, n_tokens, token_dim)."""
        r = request
        with autocast(self.device, self.autocast_dtype):
            return generate_tokens(self.model, r.input_ids, r.attention_mask, r.grid[0] * r.grid[1], r.sampler,
                                   r.noise, r.guidance, r.groups, r.latents, r.pos_embed, r.use_norm, progress, trace,
                                   r.context_noise, compiled=self.compiled)

    def decode_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> list[Image.Image]:
        """Image tokens (B, h*w, token_dim) on a grid of (h, w) tokens -> PIL images."""
        return pixels_to_pil(self.decode_pixels(tokens, grid))

    @torch.inference_mode()
    def decode_pixels(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Image tokens -> VAE output (B, 3, H, W), float, about [-1, 1]."""
        latents = unpatchify(tokens.float(), self.model.config.latent_patch_size, *grid)
        # A few images at a time: for a whole batch of 64 each activation is tens of MB, and such
        # fresh allocations cost more in page faults than the convolutions (64x64 images on the
        # CPU: 1.26 s -> 0.61 s for 64, the same pixels).
        return torch.cat([self.vae.from_latents(chunk) for chunk in latents.split(DECODE_CHUNK)])

