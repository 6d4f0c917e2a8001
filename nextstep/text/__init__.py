from .sequence import (IMAGE_TAG, SOURCE_IMAGE_PLACES, THOUGHT_OPEN, image_area, image_block, image_prefix,
                       with_image_tag)
from .tokenizer import Fixed, Plain, Row, TextTokenizer

__all__ = ["IMAGE_TAG", "SOURCE_IMAGE_PLACES", "THOUGHT_OPEN", "Fixed", "Plain", "Row", "TextTokenizer",
           "image_area", "image_block", "image_prefix", "with_image_tag"]
