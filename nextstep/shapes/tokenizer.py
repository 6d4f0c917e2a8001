"""The shapes world's text tokenizer: a small byte-level BPE in NextStep's format."""

from __future__ import annotations

from ..text.bpe import train_bpe
from ..text.tokenizer import TextTokenizer
from .dataset import ShapesConfig, make_sample


def shapes_tokenizer(n_texts: int = 20000, vocab_size: int = 320) -> TextTokenizer:
    """The shapes world's tokenizer, trained on its captions and edit instructions (deterministic)."""
    captions, edits = ShapesConfig(seed=12345), ShapesConfig(seed=12345, edits=True)
    texts = [make_sample(captions, k).caption for k in range(n_texts)]
    texts += [make_sample(edits, k).instruction for k in range(n_texts // 4)]
    return train_bpe(texts, vocab_size)
