"""Samples -> model inputs: the official sequence format, labels, caption dropout, edits, a training step."""

from __future__ import annotations

import logging

import pytest
import torch

from nextstep import AutoencoderKL, NextStep, NextStepConfig
from nextstep.data import Collator, encode_images
from nextstep.data.batching import IGNORE
from nextstep.data.stream import META
from nextstep.shapes.dataset import ShapesDataset
from nextstep.text import IMAGE_TAG, TextTokenizer, image_block, image_prefix

from .conftest import REF10 as FIXTURE


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.from_pretrained(FIXTURE / "model")


def t2i(key: str, caption: str = "a red circle", h: int = 64, w: int = 64) -> dict:
    return {"key": key, "caption": caption, "pixels": torch.zeros(3, h, w)}


def edit(key: str, instruction: str = "make the red circle blue", h: int = 64, w: int = 64) -> dict:
    return {"key": key, "instruction": instruction, "source": torch.zeros(3, h, w), "target": torch.ones(3, h, w)}


def test_text_to_image_row_is_the_official_sequence(tok):
    eos = tok.tokenizer.token_to_id("<|endoftext|>")
    batch = Collator(tok, caption_dropout=0.0)([t2i("k", "a red circle")])
    ids = batch["input_ids"][0].tolist()
    assert ids == tok.encode("a red circle") + tok.encode(image_block(4, 4)) + [eos]
    # The prompt part is exactly what the pipeline feeds at inference.
    prompt, _ = tok.batch(["a red circle"], tok.encode(image_prefix(4, 4)))
    assert ids[: prompt.shape[1]] == prompt[0].tolist()
    assert batch["image_mask"][0].sum() == 16 and batch["latents_mask"].tolist() == [1.0]
    assert batch["pixel_values"][0].shape == (1, 3, 64, 64)


def test_labels_score_text_but_not_image_slots_or_padding(tok):
    batch = Collator(tok, caption_dropout=0.0)([t2i("a", "a red circle and a blue square"), t2i("b", "a square")])
    ids, labels, att = batch["input_ids"], batch["labels"], batch["attention_mask"]
    n_caption = len(tok.encode("a red circle and a blue square"))
    assert (labels[0, :n_caption] == ids[0, :n_caption]).all()  # caption: CE targets
    assert (labels[ids == tok.placeholder_id] == IGNORE).all() and (labels[ids == tok.boi_id] == IGNORE).all()
    assert (labels[ids == tok.eoi_id] == tok.eoi_id).all()
    assert labels[0, att[0].sum() - 1] == IGNORE  # end-of-text right after the image
    short = att[1].sum()
    assert (ids[1, short:] == tok.pad_id).all() and (labels[1, short:] == IGNORE).all()  # right padding
    assert att[1, :short].all() and not att[1, short:].any()


def test_non_square_images_use_their_own_grid(tok):
    batch = Collator(tok, caption_dropout=0.0)([t2i("w", h=32, w=128), t2i("s")])
    row = tok.decode(batch["input_ids"][0].tolist())
    assert "<|image_area|>2*8<|begin_of_image|>" in row
    assert batch["image_mask"][0].sum() == 16
    assert [p.shape for p in batch["pixel_values"]] == [(1, 3, 32, 128), (1, 3, 64, 64)]
    with pytest.raises(ValueError, match="multiples of 16"):
        Collator(tok).encode(t2i("bad", h=40, w=64))


def test_caption_dropout_moves_the_image_first_at_the_asked_rate(tok):
    samples = [t2i(str(k)) for k in range(3000)]
    batch = Collator(tok, caption_dropout=0.1, seed=0)(samples)
    rate = batch["caption_dropped"].float().mean().item()
    assert 0.08 < rate < 0.12
    dropped = batch["input_ids"][batch["caption_dropped"]]
    assert (dropped[:, 0] == tok.image_area_id).all()  # nothing before the image
    kept = batch["input_ids"][~batch["caption_dropped"]]
    assert (kept[:, 0] != tok.image_area_id).all()
    again = Collator(tok, caption_dropout=0.1, seed=0)(samples)  # any worker decides the same
    assert torch.equal(again["caption_dropped"], batch["caption_dropped"])
    other = Collator(tok, caption_dropout=0.1, seed=1)(samples)
    assert not torch.equal(other["caption_dropped"], batch["caption_dropped"])
    row = tok.decode(dropped[0].tolist())
    assert row.startswith("<|image_area|>4*4") and "a red circle" in row  # the caption still follows
    assert Collator(tok, caption_dropout=1.0)([t2i("x")])["caption_dropped"].all()


def test_edit_row_holds_the_source_block_then_the_target(tok):
    eos = tok.tokenizer.token_to_id("<|endoftext|>")
    batch = Collator(tok, caption_dropout=0.0)([edit("e", "make the red circle blue")])
    ids = batch["input_ids"][0].tolist()
    # What the pipeline builds from "<image>" + instruction, followed by the target image.
    caption = (IMAGE_TAG + "make the red circle blue").replace(IMAGE_TAG, image_block(4, 4))
    assert ids == tok.encode(caption) + tok.encode(image_block(4, 4)) + [eos]
    assert batch["latents_mask"].tolist() == [0.0, 1.0]  # only the target enters the image loss
    assert batch["pixel_values"][0].sum() == 0 and batch["pixel_values"][1].mean() == 1  # source first
    assert batch["image_mask"][0].sum() == 32
    mid = Collator(tok, caption_dropout=0.0)([edit("m", f"turn {IMAGE_TAG} blue")])["input_ids"][0].tolist()
    assert mid[: len(tok.encode("turn "))] == tok.encode("turn ")


def test_source_last_keeps_source_and_target_tokens_a_fixed_distance_apart(tok):
    eos = tok.tokenizer.token_to_id("<|endoftext|>")
    rows = [edit("a", "make the red circle blue"), edit("b", "remove the circle")]
    batch = Collator(tok, caption_dropout=0.0, source_image="last")(rows)
    ids = batch["input_ids"][0].tolist()
    assert ids[: len(ids) - ids[::-1].index(eos)] == (tok.encode("make the red circle blue" + image_block(4, 4))
                                                      + tok.encode(image_block(4, 4)) + [eos])
    gaps = set()
    for mask in batch["image_mask"]:
        slots = mask.nonzero()[:, 0]
        gaps |= set((slots[16:] - slots[:16]).tolist())
    assert len(gaps) == 1  # the same offset for every token, whatever the instruction's length
    first = Collator(tok, caption_dropout=0.0)(rows)["image_mask"]
    first_gaps = {tuple((m.nonzero()[16:, 0] - m.nonzero()[:16, 0]).tolist()) for m in first}
    assert len(first_gaps) == 2  # the official order: the offset depends on the instruction
    with pytest.raises(ValueError, match="source_image must be 'first' or 'last'"):
        Collator(tok, source_image="middle")


def test_edit_dropout_drops_the_instruction_then_the_source(tok):
    rows = Collator(tok, caption_dropout=1.0)([edit("e")])
    assert rows["caption_dropped"].all()
    assert rows["input_ids"][0].tolist()[: len(tok.encode(image_block(4, 4)))] == tok.encode(image_block(4, 4))
    assert "make" not in tok.decode(rows["input_ids"][0].tolist()) and len(rows["pixel_values"]) == 2
    uncond = Collator(tok, caption_dropout=0.0, source_dropout=1.0)([edit("e")])
    assert uncond["latents_mask"].tolist() == [1.0] and uncond["image_mask"].sum() == 16


def test_bad_samples_are_left_out_not_fatal(tok, caplog):
    samples = [t2i("ok"), edit("two-tags", f"{IMAGE_TAG} and {IMAGE_TAG}"), {"key": "nothing", META: None},
               t2i("long", "a " * 200)]
    samples[2].pop(META)
    with caplog.at_level(logging.WARNING, logger="nextstep.data"):
        batch = Collator(tok, max_length=60)(samples)
    assert batch["keys"] == ["ok", "long"] and batch["skipped"] == ["two-tags", "nothing"]
    assert batch["input_ids"].shape[1] <= 60  # a long caption is cut, never the image
    assert batch["image_mask"][1].sum() == 16
    assert "two-tags" in caplog.text
    too_big = Collator(tok, max_length=10)([t2i("big")])
    assert too_big["input_ids"].shape[0] == 0 and too_big["skipped"] == ["big"]


def test_a_training_step_runs_on_collated_shapes(tok):
    config = NextStepConfig.from_pretrained(FIXTURE / "model")
    torch.manual_seed(0)
    model = NextStep(config)
    vae = AutoencoderKL.from_pretrained(FIXTURE / "vae")
    for edits in (False, True):
        data = ShapesDataset(size=64, seed=1, edits=edits)
        samples = [s for _, s in zip(range(4), data)]
        batch = Collator(tok)(samples)
        data.mark_consumed(batch)
        latents = encode_images(vae, batch["pixel_values"], torch.Generator().manual_seed(0))
        assert latents.shape == (len(batch["pixel_values"]), 16, 8, 8)
        out = model(batch["input_ids"], batch["labels"], latents, batch["latents_mask"], batch["attention_mask"])
        assert torch.isfinite(out.loss) and out.im_loss > 0 and out.lm_loss > 0
        out.loss.backward()
        assert data.consumed == 4
    mixed = Collator(tok, caption_dropout=0.0)([t2i("w", h=32, w=128), t2i("s")])
    latents = encode_images(vae, mixed["pixel_values"])
    assert isinstance(latents, list) and [z.shape for z in latents] == [(1, 16, 4, 16), (1, 16, 8, 8)]
    out = model(mixed["input_ids"], mixed["labels"], latents, None, mixed["attention_mask"])
    assert torch.isfinite(out.loss)


def test_collator_checks_its_arguments(tok):
    with pytest.raises(ValueError, match="caption_dropout"):
        Collator(tok, caption_dropout=1.5)
    with pytest.raises(ValueError, match="no images"):
        encode_images(torch.nn.Linear(1, 1), [])
