from .sequence import IMAGE_TAG, image_area, image_block, image_prefix
from .tokenizer import TextTokenizer

__all__ = ["IMAGE_TAG", "TextTokenizer", "image_area", "image_block", "image_prefix"]
