"""Samples -> the model's training inputs, in NextStep-1's sequence format.

Text-to-image row (an image of h x w tokens, h = height / token side in pixels: 16 for
NextStep's f8 VAE and 2x2 latent patches):

    caption + <|image_area|>h*w <|begin_of_image|> + h*w placeholders + <|end_of_image|> + <|endoftext|>

With probability `caption_dropout` (default 0.1) the caption is dropped for
classifier-free guidance the official way: the image block moves to the front
and the caption follows it (image, then caption, then end-of-text), so the image
is learnt with no text before it (what an empty prompt conditions on at
inference) while the caption text still trains the language head.

Editing row, the instruction holding the source image where `<image>` stands
(if it has no tag: at its start, or with `source_image="last"` at its end, which puts
source token k a fixed distance before target token k), then the target:

    [text before <image>] + source block + [text after] + target block + <|endoftext|>

Editing dropout: with `caption_dropout` the instruction text is dropped (source
block, target block: the pipeline's image-only guidance row); with
`source_dropout` (default 0, as the official recipe) both are dropped (target
block alone: the unconditional row). Only the target enters the image loss
(`latents_mask` 0 for sources), as officially.

A sample with a "plan" (self-CoT, docs/self-cot.md: the shapes world's description of
the image it is about to draw) holds it right before the (target) image block, opened by
`THOUGHT_OPEN` and closed by the block's `<|image_area|>`:

    caption + THOUGHT_OPEN + plan + image block + <|endoftext|>
    [text before <image>] + source block + [text after] + THOUGHT_OPEN + plan + target block + ...

The caption, `THOUGHT_OPEN` and the plan are encoded separately and joined, as a
generation prompt is (the thought is sampled after the encoded caption + `THOUGHT_OPEN`,
then encoded on its own), so training and generation see the same ids. With caption
dropout a text-to-image row reads image block + caption + THOUGHT_OPEN + plan +
end-of-text (the text still trains the language head, the image is unconditional); in
an edit row the plan is dropped with the instruction, since it would give the text away.
With `edit_thought_tokens = N` an edit row's plan is padded with [PAD] to N tokens (a longer
plan leaves the sample out), so target token k sits a fixed distance after source token k
whatever the plan says: the distance at which the model copies its source stays one number, as
without a plan. The first [PAD] is a CE target (it ends the thought), the rest are not; the
pipeline pads a written thought the same way (setting `edit_thought_tokens`).
With `edit_source_after_thought` a planned edit row holds its source twice, the second time
right after the plan, so the target follows a source as closely as in an unplanned row:

    [text before <image>] + source block + [text after] + THOUGHT_OPEN + plan + source block + target block

(the plan then ends at the second source's `<|image_area|>`; the pipeline lays out a written
thought the same way, setting `edit_source_after_thought`).

Labels are the input ids, with -100 (no cross-entropy) at padding, at
begin-of-image and the placeholders, and at the end-of-text right after an
image; the caption, the image-area tokens and end-of-image are CE targets, as
in the official recipe, and so is a plan. (The model itself never scores a
position whose next token is a placeholder: that position trains the flow head
instead.) Rows are right-padded.

Caption dropout is decided by hashing (seed, sample key, epoch), so it does not
depend on which worker collates the sample and differs between epochs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..text import IMAGE_TAG, SOURCE_IMAGE_PLACES, THOUGHT_OPEN, TextTokenizer, image_area, with_image_tag
from .buckets import TOKEN_PIXELS
from .stream import META, is_bookkeeping

IGNORE = -100
logger = logging.getLogger("nextstep.data")


def _uniform(*parts: Any) -> float:
    """A deterministic number in [0, 1) from `parts`."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def eos_id(tokenizer: TextTokenizer) -> int | None:
    """The tokenizer's end-of-text id: its config's eos_token, else Qwen's <|endoftext|>, else None."""
    name = "<|endoftext|>"
    if tokenizer.folder is not None and (tokenizer.folder / "tokenizer_config.json").is_file():
        try:
            eos = json.loads((tokenizer.folder / "tokenizer_config.json").read_text()).get("eos_token")
            name = eos.get("content", name) if isinstance(eos, dict) else eos or name
        except (OSError, ValueError):
            pass
    return tokenizer.tokenizer.token_to_id(name)


class Collator:
    """`collate_fn` for a DataLoader: a list of samples -> one batch dict (see `__call__`)."""

    def __init__(self, tokenizer: TextTokenizer, caption_dropout: float = 0.1, source_dropout: float = 0.0,
                 seed: int = 0, max_length: int | None = None, add_eos: bool = True,
                 token_pixels: int = TOKEN_PIXELS, source_image: str = "first", edit_thought_tokens: int = 0,
                 edit_source_after_thought: bool = False) -> None:
        for name, p in (("caption_dropout", caption_dropout), ("source_dropout", source_dropout)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {p!r}")
        self.tokenizer = tokenizer
        self.caption_dropout, self.source_dropout = caption_dropout, source_dropout
        self.seed = seed
        self.max_length = max_length
        self.eos = eos_id(tokenizer) if add_eos else None
        self.token_pixels = token_pixels  # pixels per image token side: VAE factor x latent patch
        if source_image not in SOURCE_IMAGE_PLACES:
            raise ValueError(f"source_image must be 'first' or 'last', got {source_image!r}")
        self.source_image = source_image  # where an instruction without <image> gets its source
        if not isinstance(edit_thought_tokens, int) or edit_thought_tokens < 0:
            raise ValueError(f"edit_thought_tokens must be an integer >= 0, got {edit_thought_tokens!r}")
        self.edit_thought_tokens = edit_thought_tokens
        if edit_source_after_thought and edit_thought_tokens:
            raise ValueError("edit_source_after_thought and edit_thought_tokens are two ways to keep a planned "
                             "edit's target at its source's distance: choose one")
        self.edit_source_after_thought = edit_source_after_thought
        self._block = lru_cache(maxsize=64)(self._block_ids)

    # ------------------------------------------------------------------ one row
    def _block_ids(self, h: int, w: int) -> tuple[int, ...]:
        t = self.tokenizer
        return tuple(t.encode(image_area(h, w)) + [t.boi_id] + [t.placeholder_id] * (h * w) + [t.eoi_id])

    def _image_block(self, pixels: Tensor) -> tuple[int, ...]:
        if pixels.ndim != 3 or pixels.shape[0] != 3:
            raise ValueError(f"image must be (3, H, W), got {tuple(pixels.shape)}")
        H, W = pixels.shape[1:]
        px = self.token_pixels
        if H % px or W % px:
            raise ValueError(f"image of {W}x{H} px: sides must be multiples of {px}")
        return self._block(H // px, W // px)

    def _labels(self, ids: list[int]) -> list[int]:
        t = self.tokenizer
        labels = [IGNORE if i in (t.boi_id, t.placeholder_id) else i for i in ids]
        # A fixed-length edit thought's padding: its first [PAD] ends the thought (a CE target, as
        # `<|image_area|>` ends an unpadded one); the rest are filler the pipeline adds itself.
        for j in range(1, len(ids) if self.edit_thought_tokens else 0):
            if ids[j] == t.pad_id and ids[j - 1] == t.pad_id:
                labels[j] = IGNORE
        if self.eos is not None and len(ids) > 1 and ids[-1] == self.eos and ids[-2] == t.eoi_id:
            labels[-1] = IGNORE  # nothing to learn from end-of-text after an image
        return labels

    def encode(self, sample: dict[str, Any]) -> tuple[list[int], list[Tensor], list[float], bool]:
        """(input ids, images in sequence order, image-loss mask per image, whether text was dropped)."""
        key, epoch = sample.get("key", ""), sample.get(META, {}).get("epoch", 0)
        u = _uniform(self.seed, key, epoch)
        eos = [self.eos] if self.eos is not None else []
        enc = self.tokenizer.encode
        plan = sample.get("plan")
        if plan is not None and (not isinstance(plan, str) or not plan.strip()):
            raise ValueError(f"sample {key!r}: a plan must be non-empty text, got {plan!r}")
        thought = [] if plan is None else enc(THOUGHT_OPEN) + enc(plan)
        if "caption" in sample:
            block = list(self._image_block(sample["pixels"]))
            text = enc(sample["caption"]) + thought
            dropped = u < self.caption_dropout
            if self.max_length is not None:  # cut the caption, never the image
                text = text[: max(0, self.max_length - len(block) - len(eos))]
            ids = block + text + eos if dropped else text + block + eos
            return ids, [sample["pixels"]], [1.0], dropped
        if "instruction" in sample:
            src, tgt = sample["source"], sample["target"]
            tgt_block = list(self._image_block(tgt))
            if u < self.source_dropout:
                return tgt_block + eos, [tgt], [1.0], True
            instruction = sample["instruction"]
            if instruction.count(IMAGE_TAG) > 1:
                raise ValueError(f"instruction holds {instruction.count(IMAGE_TAG)} {IMAGE_TAG} tags; one is allowed")
            instruction = with_image_tag(instruction, self.source_image)
            dropped = u < self.source_dropout + self.caption_dropout
            before, _, after = instruction.partition(IMAGE_TAG)
            if dropped:
                before = after = ""
                thought = []
            elif thought and self.edit_thought_tokens:
                plan_ids = enc(plan)
                if len(plan_ids) > self.edit_thought_tokens:
                    raise ValueError(f"sample {key!r}: its plan has {len(plan_ids)} tokens, more than "
                                     f"edit_thought_tokens={self.edit_thought_tokens}")
                thought = enc(THOUGHT_OPEN) + self.tokenizer.fit(plan_ids, self.edit_thought_tokens)
            src_block = list(self._image_block(src))
            if thought and self.edit_source_after_thought:
                ids = enc(before) + src_block + enc(after) + thought + src_block + tgt_block + eos
                return ids, [src, src, tgt], [0.0, 0.0, 1.0], dropped
            ids = enc(before) + src_block + enc(after) + thought + tgt_block + eos
            return ids, [src, tgt], [0.0, 1.0], dropped
        raise ValueError(f"sample {key!r} has neither a caption nor an instruction (keys: {sorted(sample)})")

    # ------------------------------------------------------------------ the batch
    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Samples -> {
            input_ids (B, T) long, right-padded with [PAD];  attention_mask (B, T) long;
            labels (B, T) long, -100 where no CE;  image_mask (B, T) bool, the placeholder positions;
            pixel_values: list of (1, 3, h, w) in [-1, 1], every image of the batch in sequence
              order (row by row): encode them with `encode_images` to get the model's `latents`;
            latents_mask (N_images,) float, 1 where the image enters the image loss;
            caption_dropped (B,) bool;  keys: list[str];  meta: the samples' position bookkeeping,
              for `dataset.mark_consumed(batch)`;  skipped: keys of samples that could not be encoded
        }
        A sample that cannot be encoded (e.g. longer than max_length) is left out with a
        warning, but its bookkeeping stays in `meta`; a batch may then have fewer rows."""
        rows, images, mask, dropped, keys, skipped = [], [], [], [], [], []
        for s in samples:
            if is_bookkeeping(s):
                continue  # no data, only a worker's last skips: kept in "meta" below
            try:
                ids, ims, m, d = self.encode(s)
                if self.max_length is not None and len(ids) > self.max_length:
                    raise ValueError(f"{len(ids)} tokens exceed max_length={self.max_length}")
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                logger.warning("sample %s left out of the batch: %s", s.get("key", "?"), e)
                skipped.append(str(s.get("key", "?")))
                continue
            rows.append(ids)
            images += ims
            mask += m
            dropped.append(d)
            keys.append(str(s.get("key", "")))
        T = max((len(r) for r in rows), default=0)
        pad = self.tokenizer.pad_id
        input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            labels[i, : len(r)] = torch.tensor(self._labels(r))
            attention[i, : len(r)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "image_mask": input_ids == self.tokenizer.placeholder_id,
            "pixel_values": _share_storage(images),
            "latents_mask": torch.tensor(mask, dtype=torch.float32),
            "caption_dropped": torch.tensor(dropped, dtype=torch.bool),
            "keys": keys,
            "meta": [s[META] for s in samples if META in s],
            "skipped": skipped,
        }


def _share_storage(images: list[Tensor]) -> list[Tensor]:
    """(3, h, w) images -> (1, 3, h, w) views into one tensor per shape.

    A DataLoader worker sends each storage to the training process separately;
    one storage per shape instead of one per image makes that several times
    cheaper for small images. Stacked with numpy, which stays fast on a busy
    machine where torch's threaded copy can stall.
    """
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(tuple(im.shape), []).append(i)
    out: list[Tensor] = [None] * len(images)  # type: ignore[list-item]
    for idx in by_shape.values():
        stacked = torch.from_numpy(np.stack([images[i].detach().cpu().numpy() for i in idx]))
        for j, i in enumerate(idx):
            out[i] = stacked[j: j + 1]
    return out


@torch.no_grad()
def encode_images(vae: torch.nn.Module, pixel_values: Sequence[Tensor], generator: torch.Generator | None = None,
                  sample: bool = True) -> Tensor | list[Tensor]:
    """VAE latents (scaled, as the model consumes them) of a batch's `pixel_values`, in the same order.

    Images of one shape are encoded together. Returns one (N, C, h, w) tensor when
    all shapes agree, else a list of (1, C, h_i, w_i) - both forms `NextStep.forward`
    accepts as `latents`.
    """
    if not pixel_values:
        raise ValueError("encode_images: the batch has no images")
    param = next(vae.parameters())
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(pixel_values):
        by_shape.setdefault(tuple(p.shape), []).append(i)
    out: list[Tensor | None] = [None] * len(pixel_values)
    for idx in by_shape.values():
        x = torch.cat([pixel_values[i] for i in idx]).to(param.device, param.dtype)
        z = vae.to_latents(x, generator=generator, sample=sample)
        for j, i in enumerate(idx):
            out[i] = z[j: j + 1]
    if len(by_shape) == 1:
        return torch.cat(out)
    return out
