"""The text tokenizer: a Qwen2-style byte-level BPE read from `tokenizer.json` with `tokenizers`.

No transformers at run time. Behaves like the official
`AutoTokenizer(..., padding_side="left")`: no BOS/EOS are added, rows are
left-padded with `[PAD]`, special tokens are matched verbatim in the text.

Text from a user (a prompt typed at the CLI or sent to the server) is encoded
with `plain=True`: there the spelling of any added token (`<|endoftext|>`,
`<|begin_of_image|>`, ...) is ordinary text, so a user cannot forge the
sequence format. A row may mix the two (`Plain` pieces among markup strings).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import cached_property
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


@dataclass(frozen=True)
class Plain:
    """A piece of a prompt row that is user text: encoded as ordinary text whatever it spells."""

    text: str


@dataclass(frozen=True)
class Fixed:
    """User text encoded as `Plain`, then cut or padded with [PAD] to exactly `tokens` ids."""

    text: str
    tokens: int


# A prompt row: markup (special tokens parsed, as the official code does), or pieces of markup and
# `Plain` user text, encoded piece by piece and joined.
Row = str | tuple[str | Plain | Fixed, ...]


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

    def encode(self, text: str, plain: bool = False) -> list[int]:
        """Token ids of `text`; `plain`: user text, in which no added token is recognised."""
        tokenizer = self._plain_tokenizer if plain else self.tokenizer
        return tokenizer.encode(text, add_special_tokens=True).ids

    def encode_row(self, row: Row) -> list[int]:
        """Token ids of a prompt row. Every markup piece starts and ends with a special token, where
        the tokenizer splits the text anyway, so a row of pieces without special spellings in its
        user text gets the same ids as the same row written as one string."""
        if isinstance(row, str):
            return self.encode(row)
        return [i for piece in row for i in self._encode_piece(piece)]

    def _encode_piece(self, piece: str | Plain | Fixed) -> list[int]:
        if isinstance(piece, Fixed):
            return self.fit(self.encode(piece.text, plain=True), piece.tokens)
        return self.encode(piece.text, plain=True) if isinstance(piece, Plain) else self.encode(piece)

    def fit(self, ids: list[int], tokens: int) -> list[int]:
        """`ids` cut or padded with [PAD] to exactly `tokens` ids (an edit's fixed-length thought)."""
        return ids[:tokens] + [self.pad_id] * (tokens - len(ids))

    @cached_property
    def _plain_tokenizer(self) -> Tokenizer:
        """A copy of the tokenizer that reads every added token's spelling as ordinary text. Each
        added token is marked special (a tokenizer may leave some unmarked) and
        `encode_special_tokens` makes special ones plain text; the shared tokenizer is not toggled
        because server threads encode concurrently. Built on first use: training never needs it."""
        config = json.loads(self.tokenizer.to_str())
        for token in config.get("added_tokens", []):
            token["special"] = True
        tokenizer = Tokenizer.from_str(json.dumps(config))
        tokenizer.encode_special_tokens = True
        return tokenizer

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch(self, texts: list[Row], suffix: list[int] = (), width: int | None = None) -> tuple[Tensor, Tensor]:
        """Left-padded `input_ids` and `attention_mask` (B, T) of `texts` (rows: see `Row`), each
        followed by `suffix`. T is the longest row, or `width` if given (a longer row is an error)."""
        rows = [self.encode_row(t) + list(suffix) for t in texts]
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
