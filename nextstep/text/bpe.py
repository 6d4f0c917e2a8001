"""Training a small byte-level BPE tokenizer in NextStep's format (for models trained from scratch).

The result is laid out like the official one: a Qwen2-style byte-level BPE
(NFC, Qwen2's split pattern, no BOS/EOS added), then `<|endoftext|>`,
`<|im_start|>`, `<|im_end|>`, then NextStep's special tokens in their official
order, so `TextTokenizer` and the pipeline treat it exactly like the real one.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from .tokenizer import SPECIAL_TOKENS, TextTokenizer

# Qwen2's pre-tokenizer pattern: contractions, letter runs, single digits, punctuation, spaces.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_bpe(texts: Iterable[str], vocab_size: int = 512) -> TextTokenizer:
    """A byte-level BPE of `vocab_size` entries (the 256 bytes included) plus the special tokens."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(list(CHAT_TOKENS) + list(SPECIAL_TOKENS))
    return TextTokenizer(tok, "trained BPE")
