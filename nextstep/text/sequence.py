"""The sequence format: how captions and images become one token stream.

An image of h x w tokens is written as
`<|image_area|>{h}*{w}<|begin_of_image|>` + h*w `<|image_placeholder|>` + `<|end_of_image|>`;
the placeholders are later filled with projected image tokens. A generation
prompt ends right after `<|begin_of_image|>`.
"""

from __future__ import annotations

from .tokenizer import BEGIN_OF_IMAGE, END_OF_IMAGE, IMAGE_AREA, IMAGE_PLACEHOLDER

IMAGE_TAG = "<image>"  # where an edit caption puts its source image


def image_area(h_tokens: int, w_tokens: int) -> str:
    return f"{IMAGE_AREA}{h_tokens}*{w_tokens}"


def image_prefix(h_tokens: int, w_tokens: int) -> str:
    """What a generation prompt ends with: the image's size, then begin-of-image."""
    return image_area(h_tokens, w_tokens) + BEGIN_OF_IMAGE


def image_block(h_tokens: int, w_tokens: int) -> str:
    """A whole image in text form, its tokens as placeholders."""
    return image_prefix(h_tokens, w_tokens) + IMAGE_PLACEHOLDER * (h_tokens * w_tokens) + END_OF_IMAGE
