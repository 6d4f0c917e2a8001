"""The sequence format: how captions and images become one token stream.

An image of h x w tokens is written as
`<|image_area|>{h}*{w}<|begin_of_image|>` + h*w `<|image_placeholder|>` + `<|end_of_image|>`;
the placeholders are later filled with projected image tokens. A generation
prompt ends right after `<|begin_of_image|>`.

Self-CoT (docs/self-cot.md): a row may carry a thought between its text and the image it
generates, `THOUGHT_OPEN` + thought, ended by the image block's own `<|image_area|>`:

    caption + "\nthought: " + thought + <|image_area|>h*w<|begin_of_image|> ...

No new special tokens, so official checkpoints and tokenizers load unchanged. In an edit row
the thought stands right before the target image block.
"""

from __future__ import annotations

from .tokenizer import BEGIN_OF_IMAGE, END_OF_IMAGE, IMAGE_AREA, IMAGE_PLACEHOLDER

IMAGE_TAG = "<image>"  # where an edit caption puts its source image
THOUGHT_OPEN = "\nthought: "  # what opens a thought; the next <|image_area|> closes it
# Where an edit prompt without an `<image>` tag gets its source image: "first" (before the
# instruction, as the official models are trained) or "last" (right before the target, so
# that source token k and target token k are a fixed number of positions apart).
SOURCE_IMAGE_PLACES = ("first", "last")


def with_image_tag(prompt: str, place: str = "first") -> str:
    """An edit prompt with its source-image slot: `<image>` goes at the `place` ("first" or
    "last") unless the prompt places it itself."""
    if place not in SOURCE_IMAGE_PLACES:
        raise ValueError(f"source image place must be one of {list(SOURCE_IMAGE_PLACES)}, got {place!r}")
    if IMAGE_TAG in prompt:
        return prompt
    return IMAGE_TAG + prompt if place == "first" else prompt + IMAGE_TAG


def image_area(h_tokens: int, w_tokens: int) -> str:
    return f"{IMAGE_AREA}{h_tokens}*{w_tokens}"


def image_prefix(h_tokens: int, w_tokens: int) -> str:
    """What a generation prompt ends with: the image's size, then begin-of-image."""
    return image_area(h_tokens, w_tokens) + BEGIN_OF_IMAGE


def image_block(h_tokens: int, w_tokens: int) -> str:
    """A whole image in text form, its tokens as placeholders."""
    return image_prefix(h_tokens, w_tokens) + IMAGE_PLACEHOLDER * (h_tokens * w_tokens) + END_OF_IMAGE
