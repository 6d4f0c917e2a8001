"""The synthetic shapes world (`shared/specs/shapes-world.md`): data, checker and benchmarks.

    world      vocabulary (shapes, colours, backgrounds, categories), geometry rules, `Scene`
    grammar    captions and edit instructions: formatters and strict parsers
    renderer   a `Scene` to pixels
    sampling   captions, the scenes they describe, and edits, drawn from a seeded generator
    dataset    `make_sample(config, k)` and the endless `ShapesDataset` the small model trains on
    tokenizer  the shapes world's BPE tokenizer (trained on its captions and instructions)
    detector   find the background and the objects in an image
    checker    judge an image against a caption, or an edit against its instruction
    corrupt    damaged and wrong scenes, to test the checker
    plan       plans (self-CoT): a scene as "COLOUR SHAPE ROW COLUMN, ...", parsed and checked
    benchmark  the GenEval-style benchmarks (`nextstep eval shapes|edits`)

The model, sampling, VAE, text, io, pipeline, serving and config packages must
import nothing from this package (tests/test_shapes.py checks it); training and
the CLI may.
This module exports the common names; `tokenizer` and `benchmark` are imported
from their modules (they pull in the tokenizers library and the pipeline).
"""

from .checker import CheckResult, check, check_edit
from .dataset import ShapesConfig, ShapesDataset, ShapesSample, make_sample
from .detector import Detected, Detection, detect
from .grammar import Caption, CaptionError, Edit, Phrase, parse_caption, parse_instruction
from .renderer import render, render_image
from .sampling import sample_caption, sample_edit, sample_scene, scene_for_caption
from .world import BACKGROUNDS, CATEGORIES, COLOURS, EDIT_OPS, RELATIONS, SHAPES, Scene, SceneObject

__all__ = ["BACKGROUNDS", "CATEGORIES", "COLOURS", "EDIT_OPS", "RELATIONS", "SHAPES", "Caption", "CaptionError",
           "CheckResult", "Detected", "Detection", "Edit", "Phrase", "Scene", "SceneObject", "ShapesConfig",
           "ShapesDataset", "ShapesSample", "check", "check_edit", "detect", "make_sample", "parse_caption",
           "parse_instruction", "render", "render_image", "sample_caption", "sample_edit", "sample_scene",
           "scene_for_caption"]
