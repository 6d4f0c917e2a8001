"""The text tokenizer: a Qwen2-style byte-level BPE read from `tokenizer.json` with `tokenizers`.

No transformers at run time. Behaves like the official
`AutoTokenizer(..., padding_side="left")`: no BOS/EOS are added, rows are
left-padded with `[PAD]`, special tokens are matched verbatim in the text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import Tensor

from ..errors import CheckpointError

# The files save_pretrained copies, when the source folder has them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")

PAD = "[PAD]"
IMAGE_AREA = "<|image_area|>"
BEGIN_OF_IMAGE = "<|begin_of_image|>"
END_OF_IMAGE = "<|end_of_image|>"
IMAGE_PLACEHOLDER = "<|image_placeholder|>"
# NextStep adds these to Qwen2.5's vocabulary, in this order, after [PAD].
SPECIAL_TOKENS = (PAD, IMAGE_AREA, BEGIN_OF_IMAGE, END_OF_IMAGE, IMAGE_PLACEHOLDER,
                  "<|begin_of_prompt_refinement|>", "<|end_of_prompt_refinement|>",
                  "<|begin_of_thinking|>", "<|end_of_thinking|>")


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, source: str = "tokenizer") -> None:
        self.tokenizer = tokenizer
        self.source = source
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise CheckpointError(f"{source}: tokenizer lacks NextStep's special tokens {missing}")
        self.pad_id = tokenizer.token_to_id(PAD)
        self.boi_id = tokenizer.token_to_id(BEGIN_OF_IMAGE)
        self.eoi_id = tokenizer.token_to_id(END_OF_IMAGE)
        self.placeholder_id = tokenizer.token_to_id(IMAGE_PLACEHOLDER)
        self.image_area_id = tokenizer.token_to_id(IMAGE_AREA)
        self.folder: Path | None = None

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "TextTokenizer":
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: tokenizer file not found")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise CheckpointError(f"{path}: cannot read tokenizer ({e})") from None
        self = cls(tok, str(path))
        self.folder = Path(folder)
        return self

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch(self, texts: list[str], suffix: list[int] = (), width: int | None = None) -> tuple[Tensor, Tensor]:
        """Left-padded `input_ids` and `attention_mask` (B, T) of `texts`, each followed by `suffix`.
        T is the longest row, or `width` if given (a row longer than that is an error)."""
        rows = [e.ids + list(suffix) for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
        longest = max(len(r) for r in rows)
        if width is not None and longest > width:
            raise ValueError(f"the prompt is {longest} tokens long; at most {width} fit")
        width = longest if width is None else width
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r):] = torch.tensor(r)
                mask[i, width - len(r):] = 1
        return ids, mask

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.folder is None:  # built in memory: write tokenizer.json and the files transformers reads
            self.tokenizer.save(str(folder / "tokenizer.json"))
            specials = [t for t in SPECIAL_TOKENS if t != PAD]
            config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|endoftext|>",
                      "pad_token": PAD, "additional_special_tokens": specials, "clean_up_tokenization_spaces": False,
                      "model_max_length": 131072, "padding_side": "left"}
            (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
            special_map = {"eos_token": "<|endoftext|>", "pad_token": PAD, "additional_special_tokens": specials}
            (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
            return
        for name in TOKENIZER_FILES:
            src = self.folder / name
            if src.is_file() and src.resolve() != (folder / name).resolve():
                shutil.copyfile(src, folder / name)
