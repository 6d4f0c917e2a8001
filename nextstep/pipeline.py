"""NextStepPipeline: captions (and source images) in, PIL images out.

`generate_image` keeps the official signature and semantics, so scripts
written for the official pipeline port by changing one import. Where the
official code crashed or silently did something else, we either do the right
thing or raise a clear error (see docs/differences.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .devices import DTYPE_NAMES, autocast, resolve
from .errors import CheckpointError
from .io import load_model, save_model
from .io.atomic import atomic_write
from .model import NextStep, unpatchify
from .model.pos_embed import sincos_2d
from .sampling import FlowSampler
from .sampling.autoregressive import generate_tokens
from .sampling.flow import SAMPLERS
from .text import IMAGE_TAG, SOURCE_IMAGE_PLACES, TextTokenizer, image_block, image_prefix, with_image_tag
from .vae import AutoencoderKL, DiagonalGaussian

CFG_SCHEDULES = ("constant", "linear")
DECODE_CHUNK = 8  # images per VAE decoder call (see decode_pixels)

# The small shapes-world model that ships inside the package (official layout).
SHIPPED_MODEL = Path(__file__).resolve().parent / "assets" / "shapes"

# A model folder may carry this file to say how it is best sampled; `pipe(...)` and the
# CLI read their defaults from it. Without it: what the official examples use, and a
# size of latent_size * (VAE down factor) pixels (512 for the official 1.0 and 1.1).
GENERATION_DEFAULTS_FILE = "generation_defaults.json"
OFFICIAL_DEFAULTS: dict[str, Any] = {"cfg": 7.5, "cfg_img": 2.0, "num_sampling_steps": 28, "use_norm": False,
                                     "timesteps_shift": 1.0, "cfg_schedule": "constant", "sampler": None,
                                     "source_image": "first", "cpu_dtype": None, "context_noise": 0.0}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_DEFAULT_CHECKS = {
    "cfg": (lambda v: _is_number(v) and v >= 1, "a number >= 1"),
    "cfg_img": (lambda v: _is_number(v) and v >= 1, "a number >= 1"),
    "num_sampling_steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "hw": (lambda v: isinstance(v, list) and len(v) == 2
           and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in v), "[height, width]"),
    "use_norm": (lambda v: isinstance(v, bool), "true or false"),
    "timesteps_shift": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "cfg_schedule": (lambda v: v in CFG_SCHEDULES, f"one of {list(CFG_SCHEDULES)}"),
    "sampler": (lambda v: v is None or v in SAMPLERS, f"null or one of {list(SAMPLERS)}"),
    "source_image": (lambda v: v in SOURCE_IMAGE_PLACES, f"one of {list(SOURCE_IMAGE_PLACES)}"),
    # what the model runs in on a CPU when the caller does not say (see nextstep.devices)
    "cpu_dtype": (lambda v: v is None or v in DTYPE_NAMES, f"null or one of {list(DTYPE_NAMES)}"),
    # std of the noise on each sampled token as the decoder reads it back (for models trained
    # with `train.context_noise`; the image itself gets the clean token)
    "context_noise": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
}


def load_generation_defaults(model_dir: str | Path) -> dict[str, Any]:
    """The settings in `<model_dir>/generation_defaults.json` ({} without the file), checked key by key."""
    path = Path(model_dir) / GENERATION_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
    for key, value in d.items():
        if key not in _DEFAULT_CHECKS:
            raise CheckpointError(f"{path}: unknown key {key!r}; expected some of {list(_DEFAULT_CHECKS)}")
        ok, expected = _DEFAULT_CHECKS[key]
        if not ok(value):
            raise CheckpointError(f"{path}: {key} must be {expected}, got {value!r}")
    return d


def seed_from(generator: torch.Generator | int | None) -> int:
    """The seed of a diffusers-style `generator`: an int, a torch.Generator's `initial_seed()`, or
    for None a fresh one from torch's global RNG (so `torch.manual_seed` makes it repeatable)."""
    if isinstance(generator, torch.Generator):
        return generator.initial_seed()
    if isinstance(generator, int) and not isinstance(generator, bool):
        return generator
    if generator is None:
        return int(torch.randint(0, 2**31 - 1, ()).item())
    raise TypeError(f"generator must be a torch.Generator, an int or None, got {type(generator).__name__}")


@dataclass
class NextStepPipelineOutput:
    """What `pipe(...)` returns, like a diffusers pipeline output."""

    images: list[Image.Image]


def pil_to_pixels(image: Image.Image) -> Tensor:
    """PIL -> (3, H, W) float in [-1, 1] (the reference's ToTensor + Normalize(0.5, 0.5))."""
    x = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    return x.sub(0.5).div(0.5)


def pixels_to_pil(x: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in about [-1, 1] -> PIL images."""
    x = (x.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]


@dataclass
class GenerationRequest:
    """A validated generation call, ready for the token loop."""

    input_ids: Tensor  # (groups * B, T), left-padded
    attention_mask: Tensor
    latents: Tensor | list[Tensor] | None  # scaled source-image latents, one per image-bearing row
    noise: Tensor  # (n_tokens, noise_draws, B, token_dim)
    context_noise: Tensor | None  # (n_tokens, B, token_dim), already scaled: added to fed-back tokens
    guidance: list[tuple[float, float]]  # (cfg, cfg_img) per token
    groups: int
    sampler: FlowSampler
    grid: tuple[int, int]  # image tokens per column and row
    pos_embed: Tensor | None
    use_norm: bool


def merge_requests(requests: Sequence[GenerationRequest]) -> GenerationRequest:
    """One batch from several prepared requests with the same settings (size, guidance, sampler,
    prompt length). Each keeps its own prompt rows, source latents and noise, so its images are
    the ones it would get alone; the merged images come back request-major."""
    first = requests[0]
    if len(requests) == 1:
        return first
    same = ("groups", "grid", "guidance", "use_norm", "sampler")
    for r in requests[1:]:
        if (any(getattr(r, k) != getattr(first, k) for k in same) or (r.latents is None) != (first.latents is None)
                or r.input_ids.shape[1] != first.input_ids.shape[1]):
            raise ValueError("requests differ in size, guidance, sampler, prompt length or in having a source "
                             "image: they cannot share a batch")
    g = first.groups

    def by_group(x: Tensor, n_groups: int) -> Tensor:  # (n_groups * B_i, ...) -> (n_groups, B_i, ...)
        return x.reshape(n_groups, -1, *x.shape[1:])

    def merged(xs: list[Tensor], n_groups: int) -> Tensor:
        return torch.cat([by_group(x, n_groups) for x in xs], dim=1).flatten(0, 1)

    noisy = [r.context_noise is not None for r in requests]
    if any(noisy) != all(noisy):
        raise ValueError("requests differ in context noise: they cannot share a batch")
    context_noise = torch.cat([r.context_noise for r in requests], dim=1) if all(noisy) else None
    latents = None
    if first.latents is not None:
        lat = [r.latents if isinstance(r.latents, Tensor) else torch.cat(r.latents) for r in requests]
        image_groups = 2 if g == 3 else 1  # rows holding the source image: cond (and uncond_1)
        latents = merged(lat, image_groups)
    return GenerationRequest(
        merged([r.input_ids for r in requests], g), merged([r.attention_mask for r in requests], g), latents,
        torch.cat([r.noise for r in requests], dim=2), context_noise, first.guidance, g, first.sampler, first.grid,
        first.pos_embed, first.use_norm)


def guidance_schedule(cfg: float, cfg_img: float, schedule: str, n_tokens: int, family: str
                      ) -> list[tuple[float, float]]:
    """(cfg, cfg_img) for each token.

    "linear" differs by family: NextStep-1 starts at the full scale and falls
    towards 1; NextStep-1.1 rises from max(scale/2, 1) towards the full scale.
    """
    if schedule == "constant":
        return [(cfg, cfg_img)] * n_tokens
    if family == "nextstep-1":
        def scale(g: float, k: int) -> float:
            return 1 + (g - 1) * (n_tokens - k) / n_tokens
    else:
        def scale(g: float, k: int) -> float:
            return max(g / 2, 1 + (g - 1) * k / n_tokens)
    return [(scale(cfg, k), scale(cfg_img, k)) for k in range(n_tokens)]


@dataclass(frozen=True)
class FamilyBehaviour:
    """How the official pipeline of each checkpoint family samples (fixture READMEs)."""

    default_sampler: str
    shared_noise: bool  # 1.0: the k-th image of every caption gets the same noise
    reseed_after_encoding: bool  # 1.1: token noise starts from a fresh seed after encoding images


FAMILIES = {
    "nextstep-1": FamilyBehaviour("euler_maruyama", shared_noise=True, reseed_after_encoding=False),
    "nextstep-1.1": FamilyBehaviour("sde", shared_noise=False, reseed_after_encoding=True),
}


class NextStepPipeline:
    def __init__(self, model: NextStep, vae: AutoencoderKL, tokenizer: TextTokenizer,
                 generation_defaults: dict[str, Any] | None = None, autocast_dtype: torch.dtype | None = None
                 ) -> None:
        self.model, self.vae, self.tokenizer = model, vae, tokenizer
        self.autocast_dtype = autocast_dtype  # matmuls in this dtype during token sampling (None: the weights')
        # Kept apart so that save_pretrained writes back exactly what the folder said.
        self._custom_defaults = dict(generation_defaults or {})
        size = model.config.latent_size * vae.down_factor
        self.generation_defaults: dict[str, Any] = {**OFFICIAL_DEFAULTS, "hw": [size, size], **self._custom_defaults}
        cfg = model.config
        ids = {"boi": (cfg.boi, tokenizer.boi_id), "eoi": (cfg.eoi, tokenizer.eoi_id),
               "image_placeholder_id": (cfg.image_placeholder_id, tokenizer.placeholder_id)}
        wrong = {k: v for k, v in ids.items() if v[0] != v[1]}
        if wrong:
            raise CheckpointError(f"config and tokenizer disagree on special token ids (config, tokenizer): {wrong}")
        if vae.config.z_channels != cfg.latent_channels:
            raise CheckpointError(
                f"VAE has {vae.config.z_channels} latent channels, the model expects {cfg.latent_channels}")

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def down_factor(self) -> int:
        """Pixels per image token along each side (16 for f8 latents in 2x2 patches)."""
        return self.vae.down_factor * self.model.config.latent_patch_size

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) that `pipe(...)` and the CLI generate when not told: the model's own."""
        h, w = self.generation_defaults["hw"]
        return h, w

    def edit_prompt(self, instruction: str) -> str:
        """An edit instruction with its `<image>` slot where this model was trained to see it."""
        return with_image_tag(instruction, self.generation_defaults["source_image"])

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_dir: str | Path | None = None, vae_dir: str | Path | None = None,
                        device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None) -> "NextStepPipeline":
        """Load a model folder (official layout); without one, the shipped shapes-world model.
        The VAE comes from `vae_dir`, else from the config's `vae_name_or_path` (relative to the
        model folder), else from `<model_dir>/vae`. An optional `generation_defaults.json` in the
        folder sets the defaults of `pipe(...)` and the CLI, and may ask for "bf16-mixed" on CPUs
        (`cpu_dtype`; `dtype` overrides it)."""
        if model_dir is None:
            if not SHIPPED_MODEL.is_dir():
                raise CheckpointError(f"the shipped model is not installed at {SHIPPED_MODEL}; "
                                      f"pass a model folder instead")
            model_dir = SHIPPED_MODEL
        model_dir = Path(model_dir)
        defaults = load_generation_defaults(model_dir)
        device, dtype, autocast_dtype = resolve(device, dtype, defaults.get("cpu_dtype"))
        model = load_model(model_dir, device, dtype)
        tokenizer = TextTokenizer.from_pretrained(model_dir)
        if vae_dir is None:
            name = model.config.vae_name_or_path
            vae_dir = model_dir / (name if name else "vae")
            if not vae_dir.is_dir():
                raise CheckpointError(
                    f"no VAE folder at {vae_dir} (from vae_name_or_path={name!r}); pass vae_dir=")
        # The VAE stays in fp32: it is small and decoding is where precision shows.
        vae = AutoencoderKL.from_pretrained(vae_dir, device=device, dtype=torch.float32, family=model.config.family)
        return cls(model, vae, tokenizer, defaults, autocast_dtype)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the official layout: config, safetensors, tokenizer files, and the VAE in `vae/`."""
        folder = Path(folder)
        save_model(self.model, folder, config_updates={"vae_name_or_path": "vae"})
        self.tokenizer.save_pretrained(folder)
        self.vae.save_pretrained(folder / "vae")
        if self._custom_defaults:
            text = json.dumps(self._custom_defaults, indent=2) + "\n"
            atomic_write(folder / GENERATION_DEFAULTS_FILE, lambda tmp: Path(tmp).write_text(text))

    # ------------------------------------------------------------------ generation
    def generate_image(
        self,
        captions: str | Sequence[str],
        images: Image.Image | Sequence[Image.Image] | None = None,
        num_images_per_caption: int = 1,
        positive_prompt: str | None = None,
        negative_prompt: str | None = None,
        hw: tuple[int, int] = (256, 256),
        use_norm: bool = False,
        cfg: float = 1.0,
        cfg_img: float = 1.0,
        cfg_schedule: str = "constant",
        timesteps_shift: float = 1.0,
        num_sampling_steps: int = 20,
        seed: int = 42,
        progress: bool = True,
        sde_type: str | None = None,
        noise_level: float = 0.8,
        context_noise: float = 0.0,
    ) -> list[Image.Image]:
        """Generate `num_images_per_caption` images per caption (caption-major order).

        With `images`, every caption must hold exactly one `<image>`, which is
        replaced by that source image (editing). `cfg` guides by the text,
        `cfg_img` (editing only) by the source image. `sde_type` picks the sampler
        ("euler_maruyama", "sde", "cps" or "ode"); the default is the checkpoint
        family's own (NextStep-1: "euler_maruyama", NextStep-1.1: "sde"). `context_noise` > 0
        adds N(0, context_noise^2) to each sampled token where the decoder reads it back (not in the
        image), for models trained that way (`train.context_noise`); it is drawn after all other noise.
        """
        request = self.prepare(captions, images, num_images_per_caption, positive_prompt, negative_prompt, hw,
                               use_norm, cfg, cfg_img, cfg_schedule, timesteps_shift, num_sampling_steps, seed,
                               sde_type, noise_level, context_noise=context_noise)
        return self.decode_tokens(self.sample_tokens(request, progress=progress), request.grid)

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
    ) -> NextStepPipelineOutput:
        """Diffusers-style call, a thin map onto `generate_image`; unset settings come from
        `generation_defaults`. The images depend only on the seed (`seed_from(generator)`: a
        torch.Generator counts by its `initial_seed()`, not its state). `image` makes it an edit:
        each prompt gets `<image>` (`edit_prompt`) unless it holds one, one image serves every prompt or
        there is one per prompt, and the size defaults to the source image's, not `default_size`."""
        d = self.generation_defaults
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
        images, (h, w), cfg_img = None, self.default_size, 1.0
        if image is not None:
            images = [image] if isinstance(image, Image.Image) else list(image)
            images = images * len(prompts) if len(images) == 1 else images
            prompts = [self.edit_prompt(p) if isinstance(p, str) else p for p in prompts]
            cfg_img = d["cfg_img"]
            if images and isinstance(images[0], Image.Image):
                h, w = images[0].height, images[0].width

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        images_out = self.generate_image(
            prompts, images, num_images_per_prompt, negative_prompt=negative_prompt,
            hw=(pick(height, h), pick(width, w)), use_norm=d["use_norm"], cfg=pick(guidance_scale, d["cfg"]),
            cfg_img=pick(image_guidance_scale, cfg_img), cfg_schedule=d["cfg_schedule"],
            timesteps_shift=d["timesteps_shift"], num_sampling_steps=pick(num_inference_steps, d["num_sampling_steps"]),
            seed=seed_from(generator), sde_type=d["sampler"], context_noise=d["context_noise"])
        return NextStepPipelineOutput(images_out)

    def prompt_rows(self, captions: list[str], images: list[Image.Image] | None, n: int,
                    positive_prompt: str | None, negative_prompt: str | None, cfg: float, cfg_img: float
                    ) -> tuple[list[str], list[Image.Image], int]:
        """The prompt text of every row, the source image of every row that has one, and the
        number of guidance groups. Rows: [cond; uncond_1; (uncond_2)], n rows per caption each."""
        edit = images is not None
        groups = 3 if edit and cfg_img != 1 else 2 if cfg != 1 else 1
        suffix = f" {positive_prompt}" if positive_prompt else ""
        negative = negative_prompt or ""
        cond = [c for c in captions for _ in range(n)]
        row_images = [im for im in images for _ in range(n)] if edit else []
        rows = [self._with_image(c, row_images[i] if edit else None) + suffix for i, c in enumerate(cond)]
        if groups == 3:  # uncond_1 keeps the source image but not the text; uncond_2 drops both
            rows += [image_block(*self._grid(im)) + negative for im in row_images] + [negative] * len(cond)
            row_images = row_images + row_images
        elif groups == 2:
            rows += [negative] * len(cond)
        return rows, row_images, groups

    def prepare(self, captions: str | Sequence[str], images: Image.Image | Sequence[Image.Image] | None = None,
                num_images_per_caption: int = 1, positive_prompt: str | None = None,
                negative_prompt: str | None = None, hw: tuple[int, int] = (256, 256), use_norm: bool = False,
                cfg: float = 1.0, cfg_img: float = 1.0, cfg_schedule: str = "constant",
                timesteps_shift: float = 1.0, num_sampling_steps: int = 20, seed: int = 42,
                sde_type: str | None = None, noise_level: float = 0.8,
                prompt_length: int | None = None, context_noise: float = 0.0) -> GenerationRequest:
        """Validate the arguments and build everything the token loop needs (prompt ids, source
        latents, noise), drawing all randomness from one CPU generator seeded with `seed`.
        `prompt_length` left-pads every prompt row to that many tokens (a server pads all
        requests alike, so that a request's images do not depend on what shares its batch)."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        if images is not None:
            images = [images] if isinstance(images, Image.Image) else list(images)
        family = FAMILIES[self.model.config.family]
        flow = FlowSampler(sde_type or family.default_sampler, num_sampling_steps, timesteps_shift, noise_level)
        self._check(captions, images, num_images_per_caption, hw, cfg, cfg_img, cfg_schedule)
        if not (context_noise >= 0 and math.isfinite(context_noise)):
            raise ValueError(f"context_noise must be a finite number >= 0, got {context_noise}")
        n = num_images_per_caption
        config = self.model.config
        h_tok, w_tok = hw[0] // self.down_factor, hw[1] // self.down_factor
        n_tokens = h_tok * w_tok

        rows, row_images, groups = self.prompt_rows(captions, images, n, positive_prompt, negative_prompt,
                                                    cfg, cfg_img)
        input_ids, attention_mask = self.tokenizer.batch(rows, self.tokenizer.encode(image_prefix(h_tok, w_tok)),
                                                         prompt_length)
        if input_ids.shape[1] + n_tokens > config.max_position_embeddings:
            raise ValueError(f"prompt ({input_ids.shape[1]} tokens) + image ({n_tokens} tokens) exceeds "
                             f"max_position_embeddings={config.max_position_embeddings}")

        # The reference's order of draws: the source images' posterior samples, then each token's
        # noise (1.1 seeds again in between; its own code leaves the encoding unseeded).
        generator = torch.Generator().manual_seed(seed)
        latents = self._encode(row_images, generator) if row_images else None
        if family.reseed_after_encoding:
            generator.manual_seed(seed)
        n_cond = len(captions) * n
        if family.shared_noise:
            noise = torch.randn((n_tokens, flow.noise_draws, n, config.token_dim), generator=generator)
            noise = noise.repeat(1, 1, len(captions), 1)
        else:
            noise = torch.randn((n_tokens, flow.noise_draws, n_cond, config.token_dim), generator=generator)
        fed_back = None
        if context_noise > 0:
            fed_back = torch.randn((n_tokens, n_cond, config.token_dim), generator=generator) * context_noise
        pos_embed = None
        if config.use_gen_pos_embed:
            pos_embed = sincos_2d(config.hidden_size, h_tok, w_tok).to(self.device, self.model.dtype)
        return GenerationRequest(input_ids.to(self.device), attention_mask.to(self.device), latents, noise, fed_back,
                                 guidance_schedule(cfg, cfg_img, cfg_schedule, n_tokens, config.family), groups, flow,
                                 (h_tok, w_tok), pos_embed, use_norm)

    def sample_tokens(self, request: GenerationRequest, progress: bool = False,
                      trace: dict[str, list[Tensor]] | None = None) -> Tensor:
        """Run the autoregressive loop of a prepared request: (B, n_tokens, token_dim)."""
        r = request
        with autocast(self.device, self.autocast_dtype):
            return generate_tokens(self.model, r.input_ids, r.attention_mask, r.grid[0] * r.grid[1], r.sampler,
                                   r.noise, r.guidance, r.groups, r.latents, r.pos_embed, r.use_norm, progress, trace,
                                   r.context_noise)

    def decode_tokens(self, tokens: Tensor, grid: tuple[int, int]) -> list[Image.Image]:
        """Image tokens (B, h*w, token_dim) on a grid of (h, w) tokens -> PIL images."""
        return pixels_to_pil(self.decode_pixels(tokens, grid))

    @torch.inference_mode()
    def decode_pixels(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """Image tokens -> VAE output (B, 3, H, W), float, about [-1, 1]."""
        latents = unpatchify(tokens.float(), self.model.config.latent_patch_size, *grid)
        # A few images at a time: for a whole batch of 64 each activation is tens of MB, and such
        # fresh allocations cost more in page faults than the convolutions (64x64 images on the
        # CPU: 1.26 s -> 0.61 s for 64, the same pixels).
        return torch.cat([self.vae.from_latents(chunk) for chunk in latents.split(DECODE_CHUNK)])

    # ------------------------------------------------------------------ helpers
    def _grid(self, image: Image.Image) -> tuple[int, int]:
        return image.height // self.down_factor, image.width // self.down_factor

    def _with_image(self, caption: str, image: Image.Image | None) -> str:
        return caption if image is None else caption.replace(IMAGE_TAG, image_block(*self._grid(image)))

    @torch.inference_mode()
    def _encode(self, row_images: list[Image.Image], generator: torch.Generator) -> Tensor | list[Tensor]:
        """Scaled latents of each row's source image; one posterior sample per row, drawn in row order."""
        vae = self.vae
        unique = list({id(im): im for im in row_images}.values())
        posteriors = {}
        for im in unique:
            posteriors[id(im)] = vae.encode(pil_to_pixels(im)[None].to(self.device))
        shift, scale = vae.config.shift_factor, vae.config.scaling_factor
        if len({im.size for im in unique}) == 1:
            # Same size: one draw for all rows, exactly like encoding the stacked batch.
            mean = torch.cat([posteriors[id(im)].mean for im in row_images])
            logvar = torch.cat([posteriors[id(im)].logvar for im in row_images])
            z = DiagonalGaussian(mean, logvar, vae.config.deterministic).sample(generator)
            return ((z - shift) * scale).to(self.model.dtype)
        return [((posteriors[id(im)].sample(generator) - shift) * scale).to(self.model.dtype) for im in row_images]

    def _check(self, captions, images, n, hw, cfg, cfg_img, cfg_schedule) -> None:
        if not captions:
            raise ValueError("captions is empty")
        if not all(isinstance(c, str) for c in captions):
            raise TypeError("captions must be strings")
        if n < 1:
            raise ValueError(f"num_images_per_caption must be >= 1, got {n}")
        f = self.down_factor
        if len(hw) != 2 or any(not isinstance(s, int) or s < f or s % f for s in hw):
            raise ValueError(f"hw={tuple(hw)}: height and width must be positive integer multiples of {f}")
        if not (cfg >= 1 and cfg_img >= 1 and math.isfinite(cfg) and math.isfinite(cfg_img)):
            raise ValueError(f"guidance scales must be finite and >= 1 (1 means no guidance), "
                             f"got cfg={cfg}, cfg_img={cfg_img}")
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
        tags = [c.count(IMAGE_TAG) for c in captions]
        if images is None:
            if cfg_img != 1:
                raise ValueError("cfg_img guides by a source image: pass images= (editing) or leave cfg_img=1")
            if any(tags):
                raise ValueError(f"a caption contains {IMAGE_TAG} but no images were given")
            return
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images for {len(captions)} captions: give one source image per caption")
        if any(t != 1 for t in tags):
            raise ValueError(f"with images, every caption must contain exactly one {IMAGE_TAG} "
                             f"(counts: {tags})")
        for im in images:
            if not isinstance(im, Image.Image):
                raise TypeError(f"images must be PIL images, got {type(im).__name__}")
            if im.width % f or im.height % f:
                raise ValueError(f"source image of size {im.width}x{im.height}: width and height must be "
                                 f"multiples of {f} (resize or crop it first)")
