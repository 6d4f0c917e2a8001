"""From captions, source images, a seed and settings to a `GenerationRequest`.

Prompt rows are built as the official pipelines build them: [cond; uncond_1;
(uncond_2)], n rows per caption each, left-padded to the longest row. All
randomness (the source images' posterior samples, then every token's noise) is
drawn up front from one CPU generator seeded with the seed, in the order the
reference draws it, so the token loop draws nothing.

Captions are read one of two ways. By default (the official calls) they are
markup: special tokens are parsed and an edit caption's `<image>` becomes its
source image, as official scripts expect. With `plain=True` (`pipe(...)`, the
CLI and the server: text typed by users) captions, negative and positive
prompts are plain text, and each source image goes where `source_image` says.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from .config import FAMILIES
from .errors import CheckpointError
from .io.images import pil_to_pixels
from .model import NextStep
from .model.pos_embed import sincos_2d
from .sampling import FlowSampler
from .sampling.requests import GenerationRequest, guidance_schedule
from .settings import GenerationSettings
from .text import IMAGE_TAG, THOUGHT_OPEN, Fixed, Plain, Row, TextTokenizer, image_block, image_prefix
from .vae import AutoencoderKL, DiagonalGaussian


class RequestBuilder:
    """The model, its VAE and tokenizer, and how a generation call becomes a request for them."""

    def __init__(self, model: NextStep, vae: AutoencoderKL, tokenizer: TextTokenizer) -> None:
        self.model, self.vae, self.tokenizer = model, vae, tokenizer
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

    def prompt_rows(self, captions: list[str], images: list[Image.Image] | None, n: int, s: GenerationSettings,
                    plain: bool = False, thoughts: Sequence[str] | None = None
                    ) -> tuple[list[Row], list[Image.Image], int]:
        """The prompt of every row, the image of every source block in placeholder order (row by
        row), and the number of guidance groups. Rows: [cond; uncond_1; (uncond_2)], n rows per caption each. Markup rows
        are strings; `plain` rows are pieces (see `Row`) in which user text is `Plain`.
        `thoughts` (plain only; one per conditional row): each conditional row ends with
        THOUGHT_OPEN + its thought; the unconditional rows carry none (docs/self-cot.md)."""
        edit = images is not None
        groups = 3 if edit and s.cfg_img != 1 else 2 if s.cfg != 1 else 1
        cond = [c for c in captions for _ in range(n)]
        if thoughts is not None and (not plain or len(thoughts) != len(cond)):
            raise ValueError(f"thoughts go with plain prompts, one per image: got {len(thoughts)} for {len(cond)}")
        row_images = [im for im in images for _ in range(n)] if edit else []
        rows = [self._cond_row(c, row_images[i] if edit else None, s, plain,
                               None if thoughts is None else thoughts[i]) for i, c in enumerate(cond)]
        # Every source block of the cond rows, in placeholder order (two per row after a repeated source).
        cond_images = [im for im in row_images for _ in range(self.images_per_cond_row(edit, s, thoughts))]
        # uncond_1 keeps the source image but not the text; uncond_2 drops both
        if plain:
            negative: Row = (Plain(s.negative_prompt),)
            with_source = [(image_block(*self._grid(im)), *negative) for im in row_images]
        else:
            negative = s.negative_prompt
            with_source = [image_block(*self._grid(im)) + negative for im in row_images]
        if groups == 3:
            rows += with_source + [negative] * len(cond)
            return rows, cond_images + row_images, groups
        if groups == 2:
            rows += [negative] * len(cond)
        return rows, cond_images, groups

    @staticmethod
    def images_per_cond_row(edit: bool, s: GenerationSettings, thoughts: Sequence[str] | None) -> int:
        """Source images in a conditional row: none for text to image, two where an edit's thought is
        followed by its source once more (`edit_source_after_thought`), else one."""
        if not edit:
            return 0
        return 2 if thoughts is not None and s.edit_source_after_thought else 1

    def _rows_to_ids(self, rows: list[str], s: GenerationSettings) -> tuple[Tensor, Tensor]:
        h_tok, w_tok = s.hw[0] // self.down_factor, s.hw[1] // self.down_factor
        return self.tokenizer.batch(rows, self.tokenizer.encode(image_prefix(h_tok, w_tok)))

    def prompt_length(self, caption: str, image: Image.Image | None, s: GenerationSettings,
                      plain: bool = False, thought: str | None = None) -> int:
        """Tokens in the prompt rows of one image of `caption` (requests merge only at equal length)."""
        rows, _, _ = self.prompt_rows([caption], None if image is None else [image], 1, s, plain,
                                      None if thought is None else [thought])
        return self._rows_to_ids(rows, s)[0].shape[1]

    def prepare(self, captions: str | Sequence[str], images: Image.Image | Sequence[Image.Image] | None,
                n: int, seed: int, s: GenerationSettings, plain: bool = False,
                thoughts: Sequence[str] | None = None) -> GenerationRequest:
        """Check the inputs and build everything the token loop needs (prompt ids, source latents,
        noise), drawing all randomness from one CPU generator seeded with `seed`. `plain`: the
        captions are user text (see the module's docstring). `thoughts`: see `prompt_rows`."""
        captions, images = self.check_inputs(captions, images, n, s, plain)
        family = FAMILIES[self.model.config.family]
        flow = FlowSampler(s.sampler or family.default_sampler, s.num_sampling_steps, s.timesteps_shift,
                           s.noise_level, step_schedule=s.step_schedule)
        config = self.model.config
        h_tok, w_tok = s.hw[0] // self.down_factor, s.hw[1] // self.down_factor
        n_tokens = h_tok * w_tok
        rows, row_images, groups = self.prompt_rows(captions, images, n, s, plain, thoughts)
        input_ids, attention_mask = self._rows_to_ids(rows, s)
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
        if s.context_noise_std > 0:  # drawn after all other noise
            fed_back = torch.randn((n_tokens, n_cond, config.token_dim), generator=generator) * s.context_noise_std
        pos_embed = None
        if config.use_gen_pos_embed:
            pos_embed = sincos_2d(config.hidden_size, h_tok, w_tok).to(self.device, self.model.dtype)
        cfg_img = s.cfg_img if images is not None else 1.0  # text to image has no image guidance
        images_per_row = ()
        if images is not None:
            per_cond = self.images_per_cond_row(True, s, thoughts)
            images_per_row = (per_cond, 1) if groups == 3 else (per_cond,)
        return GenerationRequest(input_ids.to(self.device), attention_mask.to(self.device), latents, noise, fed_back,
                                 guidance_schedule(s.cfg, cfg_img, s.cfg_schedule, n_tokens, config.family), groups,
                                 flow, (h_tok, w_tok), pos_embed, s.use_norm, images_per_row)

    def check_inputs(self, captions: str | Sequence[str], images: Image.Image | Sequence[Image.Image] | None,
                     n: int, s: GenerationSettings, plain: bool = False
                     ) -> tuple[list[str], list[Image.Image] | None]:
        """Captions and images as lists, after checking they fit each other, `n` and this model.
        Markup captions place their source image with one `<image>`; `plain` ones never do."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        if images is not None:
            images = [images] if isinstance(images, Image.Image) else list(images)
        if not captions:
            raise ValueError("captions is empty")
        if not all(isinstance(c, str) for c in captions):
            raise TypeError("captions must be strings")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of images per caption must be an integer >= 1, got {n!r}")
        f = self.down_factor
        if s.hw is None or any(side < f or side % f for side in s.hw):
            raise ValueError(f"hw={s.hw}: height and width must be positive integer multiples of {f}")
        tags = [0 if plain else c.count(IMAGE_TAG) for c in captions]
        if images is None:
            if any(tags):
                raise ValueError(f"a caption contains {IMAGE_TAG} but no images were given")
            return captions, None
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images for {len(captions)} captions: give one source image per caption")
        if not plain and any(t != 1 for t in tags):
            raise ValueError(f"with images, every caption must contain exactly one {IMAGE_TAG} "
                             f"(counts: {tags})")
        for im in images:
            if not isinstance(im, Image.Image):
                raise TypeError(f"images must be PIL images, got {type(im).__name__}")
            if im.width % f or im.height % f:
                raise ValueError(f"source image of size {im.width}x{im.height}: width and height must be "
                                 f"multiples of {f} (resize or crop it first)")
        return captions, images

    # ------------------------------------------------------------------ helpers
    def _grid(self, image: Image.Image) -> tuple[int, int]:
        return image.height // self.down_factor, image.width // self.down_factor

    def _cond_row(self, caption: str, image: Image.Image | None, s: GenerationSettings, plain: bool,
                  thought: str | None = None, pad_thought: bool = True) -> Row:
        """The conditional row of `caption`, followed by the positive prompt, and with a `thought`
        (plain rows only) by THOUGHT_OPEN and the thought, each encoded on its own (as in training);
        an edit's thought padded to `s.edit_thought_tokens` or followed by its source again
        (`s.edit_source_after_thought`) unless `pad_thought` is False (the row a
        thought is written after ends at THOUGHT_OPEN)."""
        suffix = f" {s.positive_prompt}" if s.positive_prompt else ""
        if not plain:  # markup: the caption's <image> becomes the source image
            return (caption if image is None else caption.replace(IMAGE_TAG, image_block(*self._grid(image)))) + suffix
        tail = () if thought is None else (Plain(THOUGHT_OPEN), Plain(thought))
        if image is None:
            return (Plain(caption + suffix), *tail)
        # The source image is a piece of its own, never found by searching the user's text.
        block = image_block(*self._grid(image))
        if thought is not None and pad_thought:  # the row an edit is drawn from, after its thought
            if s.edit_thought_tokens:
                tail = (Plain(THOUGHT_OPEN), Fixed(thought, s.edit_thought_tokens))
            elif s.edit_source_after_thought:
                tail = (*tail, block)
        if s.source_image == "first":
            return (block, Plain(caption + suffix), *tail)
        return (Plain(caption), block, Plain(suffix), *tail)  # "last": where `with_image_tag` puts it

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
