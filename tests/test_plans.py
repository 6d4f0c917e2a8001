"""Plans (self-CoT in the shapes world): the plan of a scene, its parser, the two agreement checks of
the eval, and the training rows that carry a plan between the text and the image."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from nextstep.data import Collator
from nextstep.errors import ConfigError
from nextstep.shapes.dataset import ShapesConfig, ShapesDataset, make_sample
from nextstep.shapes.detector import detect
from nextstep.shapes.grammar import CaptionError
from nextstep.shapes.plan import (Plan, PlannedObject, image_agrees_with_thought, parse_plan, plan_text, scene_plan,
                                  thought_agrees_with_caption)
from nextstep.shapes.renderer import render
from nextstep.shapes.world import Scene, SceneObject
from nextstep.text import IMAGE_TAG, THOUGHT_OPEN, TextTokenizer, image_block
from nextstep.training.config import TrainConfig
from nextstep.training.sources import open_source

from .conftest import REF10

EOS = "<|endoftext|>"


def scene(*objects: tuple[str, str, tuple[int, int, int, int]], background: str = "light", size: int = 64) -> Scene:
    return Scene(size, background, tuple(SceneObject(shape, colour, box) for colour, shape, box in objects))


# Centres (8, 8): top left; (32, 54): bottom centre; (54, 32): middle right; (20, 8): top left too.
RED_CIRCLE_TL = ("red", "circle", (2, 2, 14, 14))
BLUE_SQUARE_BC = ("blue", "square", (26, 48, 38, 60))
GREEN_TRIANGLE_MR = ("green", "triangle", (48, 26, 60, 38))
YELLOW_SQUARE_TL = ("yellow", "square", (16, 4, 24, 12))


# ---------------------------------------------------------------------- plan text
def test_plan_names_every_object_by_cell_in_reading_order():
    s = scene(BLUE_SQUARE_BC, GREEN_TRIANGLE_MR, YELLOW_SQUARE_TL, RED_CIRCLE_TL)
    assert plan_text(s) == ("red circle top left, yellow square top left, green triangle middle right, "
                            "blue square bottom centre")
    dark = replace(s, background="dark")
    assert plan_text(dark).endswith("blue square bottom centre on a dark background")
    assert plan_text(scene()) == "nothing"
    assert plan_text(scene(background="dark")) == "nothing on a dark background"
    # A centre on a cell border belongs to the next cell; the last row and column keep the far edge.
    edge = scene(("red", "square", (0, 0, 64, 64)), size=64)
    assert plan_text(edge) == "red square middle centre"
    corner = scene(("red", "square", (54, 54, 64, 64)), size=64)
    assert plan_text(corner) == "red square bottom right"


def test_plans_of_sampled_scenes_match_what_the_detector_sees():
    for k in range(30):
        s = make_sample(ShapesConfig(size=64, seed=5), k)
        text = plan_text(s.scene)
        assert text.count(",") == len(s.scene.objects) - 1
        assert text.endswith("on a dark background") == (s.scene.background == "dark")
        assert image_agrees_with_thought(render(s.scene), text), (s.caption, text)


def test_edit_samples_plan_the_target():
    config = ShapesConfig(size=64, seed=2, edits=True, plan_prob=1.0)
    ops = set()
    for k in range(40):
        s = make_sample(config, k)
        assert s.plan == plan_text(s.scene) != plan_text(s.source)  # every edit changes the scene
        op = s.instruction.split(" ")[0]
        ops.add(op)
        if op == "make":  # a recolour: the plan names the new colour
            assert s.instruction.split(" ")[-1] in s.plan
    assert ops == {"make", "add", "remove", "change"}


# ---------------------------------------------------------------------- parsing
def test_parse_plan_round_trips():
    for s in (scene(BLUE_SQUARE_BC, RED_CIRCLE_TL), scene(GREEN_TRIANGLE_MR, background="dark"), scene()):
        text = plan_text(s)
        assert parse_plan(text) == scene_plan(s) and str(parse_plan(text)) == text
    assert parse_plan("  red circle top left \n") == Plan((PlannedObject("red", "circle", 0, 0),))
    # Any object order is read; the contents are what the checks compare.
    swapped = parse_plan("blue square bottom centre, red circle top left")
    assert swapped.contents() == scene_plan(scene(BLUE_SQUARE_BC, RED_CIRCLE_TL)).contents()


@pytest.mark.parametrize("text", ["", "a red circle", "red circle top", "red circle top left,",
                                  "pink circle top left", "red oval top left", "red circle left top",
                                  "red circle top left and a blue square", "nothing, red circle top left",
                                  "red circle top left on a light background", "Red circle top left",
                                  "red  circle top left", None, 3])
def test_parse_plan_rejects_what_is_not_a_plan(text):
    assert parse_plan(text) is None
    assert not thought_agrees_with_caption(text, "a red circle")
    assert not image_agrees_with_thought(render(scene(RED_CIRCLE_TL)), text)


# ---------------------------------------------------------------------- the eval's checks
@pytest.mark.parametrize("plan,caption,agrees", [
    ("red circle top left, blue square top right", "a red circle to the left of a blue square", True),
    ("blue square top left, red circle top right", "a red circle to the left of a blue square", False),
    ("red circle top centre, blue square bottom centre", "a red circle to the left of a blue square", False),
    ("red circle top centre, blue square bottom centre", "a red circle above a blue square", True),
    ("red circle bottom centre, blue square top left", "a red circle below a blue square", True),
    ("red circle middle right, blue square middle left", "a red circle to the right of a square", True),
    ("red circle top left, blue circle top right", "two circles", True),
    ("red circle top left, blue circle top right", "three circles", False),
    ("red circle top left, blue square top right", "a red circle and a blue square", True),
    ("red circle top left, blue square top right", "a green circle and a blue square", False),
    ("red circle top left", "a circle", True),
    ("red circle top left", "a circle on a dark background", False),
    ("red circle top left on a dark background", "a circle on a dark background", True),
    ("red circle top left, red circle top right", "a red circle", False),
])
def test_thought_agrees_with_caption(plan, caption, agrees):
    assert thought_agrees_with_caption(plan, caption) is agrees
    assert thought_agrees_with_caption(parse_plan(plan), caption) is agrees


def test_a_caption_outside_the_grammar_is_an_error_not_a_disagreement():
    with pytest.raises(CaptionError, match="cannot parse caption 'a red blob'"):
        thought_agrees_with_caption("red circle top left", "a red blob")


def test_the_true_plan_of_a_sampled_scene_agrees_with_its_caption():
    # Relations hold by 0.1 S between centres, which may share a grid column or row, so only the
    # categories without a relation are checked here.
    for k in range(60):
        s = make_sample(ShapesConfig(size=64, seed=7, categories=("single_object", "two_object", "counting",
                                                                   "colors", "color_attr")), k)
        assert thought_agrees_with_caption(plan_text(s.scene), s.caption), (s.caption, plan_text(s.scene))


def test_image_agrees_with_its_thought_only():
    s = scene(BLUE_SQUARE_BC, RED_CIRCLE_TL)
    image = render(s)
    det = detect(image)
    true = plan_text(s)
    for what in (image, Image.fromarray(image), det):  # an image or its detection
        assert image_agrees_with_thought(what, true)
    for wrong in ("red circle top left, green square bottom centre",  # colour
                  "red circle top left, blue square bottom left",  # cell
                  "red circle top left, blue circle bottom centre",  # shape
                  "red circle top left",  # count
                  "red circle top left, blue square bottom centre, red circle top left",
                  "red circle top left, blue square bottom centre on a dark background"):  # background
        assert not image_agrees_with_thought(det, wrong), wrong
    brown = np.array(image)
    brown[(brown != brown[0, 0]).any(-1)] = (120, 90, 60)  # the same shapes, in no palette colour
    assert not image_agrees_with_thought(brown, true)


# ---------------------------------------------------------------------- training rows
@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.from_pretrained(REF10 / "model")


CAPTION, PLAN = "a red circle to the left of a blue square", "red circle top left, blue square top right"
INSTRUCTION, EDIT_PLAN = "make the red circle green", "green circle top left, blue square top right"


def t2i(plan: str | None = PLAN) -> dict:
    return {"key": "t", "caption": CAPTION, "pixels": torch.zeros(3, 64, 64), **({"plan": plan} if plan else {})}


def edit(plan: str | None = EDIT_PLAN) -> dict:
    return {"key": "e", "instruction": INSTRUCTION, "source": torch.zeros(3, 64, 64),
            "target": torch.ones(3, 64, 64), **({"plan": plan} if plan else {})}


def row_text(tok: TextTokenizer, collator: Collator, sample: dict) -> str:
    batch = collator([sample])
    return tok.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist())


def test_text_to_image_row_holds_the_plan_before_the_image(tok):
    block = image_block(4, 4)
    row = Collator(tok, caption_dropout=0.0)([t2i()])
    ids = row["input_ids"][0].tolist()
    assert tok.decode(ids) == CAPTION + THOUGHT_OPEN + PLAN + block + EOS
    # The caption and THOUGHT_OPEN are what a thought is sampled after; the plan is encoded on its own.
    prompt = tok.encode(CAPTION) + tok.encode(THOUGHT_OPEN)
    assert prompt == tok.encode(CAPTION + THOUGHT_OPEN)
    assert ids == prompt + tok.encode(PLAN) + tok.encode(block) + [tok.tokenizer.token_to_id(EOS)]
    labels = row["labels"][0].tolist()
    assert labels[len(prompt): len(prompt) + len(tok.encode(PLAN))] == tok.encode(PLAN)  # CE targets
    # Caption dropout: the image first, unconditioned; caption and plan still train the LM head.
    dropped = Collator(tok, caption_dropout=1.0)([t2i()])
    assert tok.decode(dropped["input_ids"][0].tolist()) == block + CAPTION + THOUGHT_OPEN + PLAN + EOS
    assert dropped["caption_dropped"].all()


def test_edit_rows_hold_the_plan_before_the_target(tok):
    block = image_block(4, 4)
    first = Collator(tok, caption_dropout=0.0)
    assert row_text(tok, first, edit()) == block + INSTRUCTION + THOUGHT_OPEN + EDIT_PLAN + block + EOS
    last = Collator(tok, caption_dropout=0.0, source_image="last")
    assert row_text(tok, last, edit()) == INSTRUCTION + block + THOUGHT_OPEN + EDIT_PLAN + block + EOS
    tagged = {**edit(), "instruction": f"turn {IMAGE_TAG} green"}
    assert row_text(tok, first, tagged) == "turn " + block + " green" + THOUGHT_OPEN + EDIT_PLAN + block + EOS
    # Dropping the instruction drops its plan (it would give the text away); dropping the source too.
    assert row_text(tok, Collator(tok, caption_dropout=1.0), edit()) == block + block + EOS
    assert row_text(tok, Collator(tok, caption_dropout=0.0, source_dropout=1.0), edit()) == block + EOS


def test_rows_without_plans_are_unchanged(tok):
    """plan_prob 0 gives the same samples and rows as before plans existed; a plan only inserts its text."""
    collator = Collator(tok, caption_dropout=0.1, seed=3)
    eos = tok.tokenizer.token_to_id(EOS)
    for edits in (False, True):
        without = ShapesDataset(size=64, seed=1, edits=edits, rank=0, world_size=1)
        assert without._source_id() == (f"shapes(size=64, edits={edits}, categories={list(without.config.categories)}, "
                                        "colour_prob=0.5, dark_prob=0.2)")
        with_plans = ShapesDataset(size=64, seed=1, edits=edits, rank=0, world_size=1, plan_prob=1.0)
        a, b = iter(without), iter(with_plans)
        for _ in range(6):
            plain, planned = next(a), next(b)
            assert "plan" not in plain and planned["plan"] == plan_text(Scene.from_labels(
                planned["labels"]["target"] if edits else planned["labels"]))
            assert planned["labels"] == plain["labels"]
            stripped = {k: v for k, v in planned.items() if k != "plan"}
            assert collator([stripped])["input_ids"].tolist() == collator([plain])["input_ids"].tolist()
            if not edits:
                block = tok.encode(image_block(4, 4))
                ids = collator([plain])["input_ids"][0].tolist()
                assert ids in (tok.encode(plain["caption"]) + block + [eos],
                               block + tok.encode(plain["caption"]) + [eos])


def test_plan_prob_sets_the_share_of_planned_samples_deterministically():
    config = ShapesConfig(size=32, seed=4, plan_prob=0.3)
    planned = [make_sample(config, k).plan is not None for k in range(1000)]
    assert 0.25 < sum(planned) / 1000 < 0.35
    assert planned == [make_sample(config, k).plan is not None for k in range(1000)]
    assert all(make_sample(config, k).scene == make_sample(replace(config, plan_prob=0.0), k).scene
               for k in range(50))
    with pytest.raises(ValueError, match=r"plan_prob must be in \[0, 1\], got 1.5"):
        ShapesConfig(plan_prob=1.5)


def test_a_bad_plan_is_an_error_naming_it(tok):
    with pytest.raises(ValueError, match="a plan must be non-empty text"):
        Collator(tok).encode(t2i(plan="   "))


# ---------------------------------------------------------------------- config
def write(tmp_path, sources: str) -> TrainConfig:
    path = tmp_path / "stage.toml"
    path.write_text(f'[model]\nvae = "{REF10 / "vae"}"\n[data]\nsources = [{sources}]\n')
    return TrainConfig.from_file(path)


def test_plan_prob_config_loads_validates_and_reaches_the_stream(tmp_path):
    config = write(tmp_path, '{ kind = "shapes", size = 32, plan_prob = 0.5 }, { kind = "shapes", edits = true }')
    config.check()
    planned, plain = (open_source(s, 0, f"data.sources[{i}]", rank=0, world_size=1)
                      for i, s in enumerate(config.data.sources))
    assert planned.config.plan_prob == 0.5 and plain.config.plan_prob == 0.0
    samples = iter(planned)
    assert 0 < sum("plan" in next(samples) for _ in range(20)) < 20
    assert not any("plan" in next(iter(plain)) for _ in range(3))


@pytest.mark.parametrize("sources,message", [
    ('{ kind = "shapes", plan_prob = 1.5 }', "data.sources[0].plan_prob=1.5 (must be in [0, 1])"),
    ('{ kind = "shapes", plan_prob = -0.1 }', "data.sources[0].plan_prob=-0.1 (must be in [0, 1])"),
    ('{ kind = "shapes" }, { kind = "files", path = ".", plan_prob = 0.5 }',
     "data.sources[1].plan_prob=0.5 (only shapes sources have plans"),
    ('{ kind = "shapes", plan_prob = "often" }', "plan_prob"),
])
def test_bad_plan_prob_is_a_clear_error(tmp_path, sources, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        write(tmp_path, sources).check()
