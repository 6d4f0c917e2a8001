"""Text from the model's LM head: plain continuation, and the thoughts of self-CoT.

`TextWriter` is the part of `NextStepPipeline` that writes text. Every row is
its own job (its prompt, its seed, drawn from its own generator), and a model
call only stacks rows of the same prompt length, as `iter_generate` does for
images: a row's text is the same whatever else is written with it.

A thought (docs/self-cot.md) is sampled after the conditional row of its image,
ended by THOUGHT_OPEN instead of the image prefix: caption (+ source block for
an edit, where `source_image` says) + THOUGHT_OPEN. It stops at any special
token (the image block's `<|image_area|>` is what closes a thought in
training) or after `thought_max_tokens`. Its text is decoded and stripped;
the image is then drawn from caption + THOUGHT_OPEN + thought.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch
from PIL import Image
from torch import Tensor

from .devices import autocast
from .prepare import RequestBuilder
from .sampling.text import TextSampling, draw_uniforms, sample_text
from .settings import DEFAULT_SEED, SEED_MODULUS, GenerationSettings, InvalidSettings
from .text import Plain, Row

BATCH_ROWS = 64  # prompt rows per model call in `generate_text`, unless told
# generate_text's arguments and the settings they override.
ARGUMENTS = {"max_new_tokens": "thought_max_tokens", "temperature": "text_temperature", "top_k": "text_top_k",
             "top_p": "text_top_p"}


class TextWriter(RequestBuilder):
    """Text generation for a pipeline that has `settings` (GenerationSettings) and `autocast_dtype`."""

    settings: GenerationSettings
    autocast_dtype: torch.dtype | None

    @cached_property
    def special_ids(self) -> list[int]:
        """Ids of the tokenizer's special tokens ([PAD], <|endoftext|>, the image tokens, ...): where
        a thought, and by default any generated text, stops."""
        added = self.tokenizer.tokenizer.get_added_tokens_decoder()
        return sorted(i for i, token in added.items() if token.special)

    def generate_text(self, prompt: str | Sequence[str], max_new_tokens: int | None = None,
                      temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                      seed: int | Sequence[int] | None = None, stop: Sequence[int | str] | None = None,
                      batch_size: int = BATCH_ROWS) -> str | list[str]:
        """Continue plain-text prompts with the LM head. Unset arguments come from `self.settings`
        (`max_new_tokens`: thought_max_tokens; temperature, top_k, top_p: text_temperature, ...;
        temperature 0 is greedy). `seed`: one for every prompt (each prompt alone gives the same
        text), or one per prompt. `stop`: token ids or single-token strings that end a row (not
        returned); default every special token. Returns a str for a str prompt, else a list."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        given = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p}
        try:
            s = self.settings.with_overrides(**{ARGUMENTS[k]: v for k, v in given.items()})
        except InvalidSettings as e:  # name the arguments as the caller wrote them
            message = str(e)
            for argument, setting in ARGUMENTS.items():
                message = message.replace(f"{setting}=", f"{argument}=")
            raise ValueError(message) from None
        seeds = self._seeds(seed, len(prompts))
        stop_ids = self.special_ids if stop is None else [self._token_id(t) for t in stop]
        rows: list[Row] = [(Plain(p),) for p in prompts]
        ids = self.write(rows, [None] * len(rows), seeds, s, stop_ids, batch_size)
        texts = [self.tokenizer.decode(t) for t in ids]
        return texts[0] if isinstance(prompt, str) else texts

    def write_thoughts(self, prompts: Sequence[str], images: Sequence[Image.Image] | None,
                       seeds: Sequence[int], n: int, s: GenerationSettings, batch_size: int) -> list[list[str]]:
        """The thought of image k of every prompt (seed `seeds[i] + k`), stripped: [prompt][k]."""
        rows, sources, row_seeds = [], [], []
        for i, p in enumerate(prompts):
            image = None if images is None else images[i]
            for k in range(n):
                rows.append(self.thought_prompt(p, image, s))
                sources.append(image)
                row_seeds.append((seeds[i] + k) % SEED_MODULUS)
        ids = self.write(rows, sources, row_seeds, s, self.special_ids, batch_size)
        thoughts = [self.thought_text(t) for t in ids]
        return [thoughts[i * n:(i + 1) * n] for i in range(len(prompts))]

    def thought_prompt(self, prompt: str, image: Image.Image | None, s: GenerationSettings) -> Row:
        """The row a thought continues: the conditional row of a plain prompt, up to THOUGHT_OPEN."""
        return self._cond_row(prompt, image, s, plain=True, thought="", pad_thought=False)

    def thought_text(self, ids: Sequence[int]) -> str:
        """A thought's text from its token ids (stripped, as it goes into the image's prompt)."""
        return self.tokenizer.decode(list(ids)).strip()

    def write(self, rows: Sequence[Row], sources: Sequence[Image.Image | None], seeds: Sequence[int],
              s: GenerationSettings, stop_ids: Sequence[int], batch_size: int,
              trace: dict[str, list[Tensor]] | None = None) -> list[list[int]]:
        """New token ids after each prompt row (`sources`: the source image of a row that holds one
        image block, else None), up to `s.thought_max_tokens` each, chosen by `s.text_*`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        sampling = TextSampling(s.text_temperature, s.text_top_k, s.text_top_p)
        encoded = [self.tokenizer.encode_row(r) for r in rows]
        if not all(encoded):
            raise ValueError("a prompt is empty: there is nothing to continue")
        by_length: dict[int, list[int]] = {}
        for j, ids in enumerate(encoded):
            by_length.setdefault(len(ids), []).append(j)
        out: list[list[int]] = [[] for _ in rows]
        for same_length in by_length.values():
            for start in range(0, len(same_length), batch_size):
                batch = same_length[start:start + batch_size]
                input_ids = torch.tensor([encoded[j] for j in batch], device=self.device)
                # The source latents of an edit row: a posterior sample drawn with the row's seed.
                latents = [self._encode([sources[j]], torch.Generator().manual_seed(seeds[j]))
                           for j in batch if sources[j] is not None] or None
                uniforms = draw_uniforms([seeds[j] for j in batch], s.thought_max_tokens)
                with autocast(self.device, self.autocast_dtype):
                    new = sample_text(self.model, input_ids, torch.ones_like(input_ids), s.thought_max_tokens,
                                      sampling, uniforms, stop_ids, len(self.tokenizer), latents, trace)
                for j, ids in zip(batch, new):
                    out[j] = ids
        return out

    # ------------------------------------------------------------------ helpers
    def _seeds(self, seed: int | Sequence[int] | None, count: int) -> list[int]:
        if seed is None or isinstance(seed, int):
            seeds = [DEFAULT_SEED if seed is None else seed] * count
        else:
            seeds = list(seed)
        if len(seeds) != count:
            raise ValueError(f"{len(seeds)} seeds for {count} prompts")
        for x in seeds:
            if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < SEED_MODULUS:
                raise ValueError(f"seed must be an integer between 0 and {SEED_MODULUS - 1}, got {x!r}")
        return seeds

    def _token_id(self, token: int | str) -> int:
        """A stop token given by id or by its spelling (which must be one token)."""
        if isinstance(token, int) and not isinstance(token, bool):
            if not 0 <= token < self.model.config.vocab_size:
                raise ValueError(f"stop token id {token} is outside the vocabulary of "
                                 f"{self.model.config.vocab_size} ids")
            return token
        if isinstance(token, str):
            found = self.tokenizer.tokenizer.token_to_id(token)
            ids = [found] if found is not None else self.tokenizer.encode(token, plain=True)
            if len(ids) != 1:
                raise ValueError(f"stop {token!r} is {len(ids)} tokens; a stop must be one token (or its id)")
            return ids[0]
        raise TypeError(f"stop tokens are ids or strings, got {type(token).__name__}")
