"""The shapes world: renderer against the spec, grammar, checker agreement, dataset, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from nextstep.cli import main
from nextstep.shapes import (
    BACKGROUNDS,
    CATEGORIES,
    COLOURS,
    Caption,
    CaptionError,
    Edit,
    Phrase,
    Scene,
    SceneObject,
    ShapesConfig,
    ShapesDataset,
    check,
    check_edit,
    detect,
    make_sample,
    parse_caption,
    parse_instruction,
    render,
    render_image,
    sample_edit,
    sample_scene,
)
from nextstep.shapes.corrupt import corrupt, corrupt_edit, degrade
from nextstep.shapes.renderer import shape_mask
from nextstep.shapes.world import relation_holds

SPEC_COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 90, 220),
                "yellow": (240, 200, 40), "purple": (140, 60, 180), "orange": (245, 140, 30)}


def test_palette_and_backgrounds_are_the_spec_values():
    assert COLOURS == SPEC_COLOURS
    assert BACKGROUNDS == {"light": (245, 245, 245), "dark": (25, 25, 25)}


@pytest.mark.parametrize("size", [64, 128, 256])
def test_renders_follow_the_placement_rules_and_match_their_labels(size):
    n = {64: 150, 128: 40, 256: 10}[size]
    config = ShapesConfig(size=size, seed=5, colour_prob=0.5, dark_prob=0.5)
    for k in range(n):
        s = make_sample(config, k)
        scene = s.scene
        image = render(scene)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert 1 <= len(scene.objects) <= 4
        covered = np.zeros((size, size), dtype=bool)
        for o in scene.objects:
            x0, y0, x1, y1 = o.bbox
            d = x1 - x0
            assert y1 - y0 == d and round(0.18 * size) <= d <= round(0.30 * size)
            assert min(x0, y0) >= 0.03 * size and max(x1, y1) <= size - 0.03 * size
            mask = shape_mask(o.shape, d)
            # The shape touches all four sides of its box, so the labelled box is the drawn box.
            assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
            assert (image[y0:y1, x0:x1][mask] == COLOURS[o.colour]).all()
            covered[y0:y1, x0:x1] |= mask
        assert (image[~covered] == BACKGROUNDS[scene.background]).all()
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1:]:
                ax0, ay0, ax1, ay1 = a.bbox
                bx0, by0, bx1, by1 = b.bbox
                gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
                assert gap >= 0.04 * size
        cap = parse_caption(s.caption)
        if cap.relation:
            a, b = scene.objects
            assert relation_holds(a.centre, b.centre, cap.relation, size, extra=1.0)


def test_shapes_fill_their_box_as_the_spec_draws_them():
    tri = shape_mask("triangle", 12)
    assert tri[-1].all() and tri[0].sum() <= 2  # base full width (= height), apex on top
    assert shape_mask("square", 7).all()
    circle = shape_mask("circle", 20)
    assert circle[10].all() and not circle[0, 0]


def test_samples_are_pure_functions_of_seed_and_index():
    a, b = ShapesConfig(seed=1), ShapesConfig(seed=2)
    assert make_sample(a, 7) == make_sample(a, 7)
    assert (render(make_sample(a, 7).scene) == render(make_sample(a, 7).scene)).all()
    assert [make_sample(a, k).caption for k in range(10)] != [make_sample(b, k).caption for k in range(10)]


def test_benchmark_categories_produce_their_caption_kinds():
    seen = {}
    for cat in CATEGORIES:
        rng = np.random.default_rng(0)
        caps = [sample_scene(rng, 64, cat)[1] for _ in range(30)]
        seen[cat] = caps
        for c in caps:
            has_colour = any(p.colour for p in c.objects)
            assert has_colour == (cat in ("colors", "color_attr"))
            if cat in ("two_object", "position", "color_attr"):
                assert c.objects[0].shape != c.objects[1].shape
    assert {c.form for c in seen["counting"]} == {"count"} and {len(c.objects) for c in seen["counting"]} == {2, 3, 4}
    assert {c.form for c in seen["position"]} == {"relation"}
    assert {c.relation for c in seen["position"]} == {"to the left of", "to the right of", "above", "below"}


def test_raster_order_names_first_the_object_the_tokens_reach_first():
    """Two-object captions under `raster_order`: the same scenes, the same captions up to the order of
    their two phrases, and the first phrase's object starts at the earlier image token (row by row,
    16-pixel tokens), or in the same token no lower and no further right."""
    plain, ordered = ShapesConfig(seed=5), ShapesConfig(seed=5, raster_order=True)
    swapped = 0
    for k in range(300):
        a, b = make_sample(plain, k), make_sample(ordered, k)
        assert a.scene == b.scene and a.category == b.category
        ca, cb = parse_caption(a.caption), parse_caption(b.caption)
        if ca.form != "and":
            assert a.caption == b.caption
            continue
        assert set(ca.objects) == set(cb.objects) and ca.background == cb.background
        swapped += ca.objects != cb.objects
        first, second = (next(o for o in b.scene.objects if p.matches(o.shape, o.colour)) for p in cb.objects)
        (x0, y0), (x1, y1) = first.bbox[:2], second.bbox[:2]
        assert (y0 // 16, x0 // 16, y0, x0) <= (y1 // 16, x1 // 16, y1, x1), (b.caption, b.scene)
        assert check(render(b.scene), b.caption).passed
    assert 20 < swapped < 80  # about half of the ~100 two-object captions were named the other way


def test_raster_order_and_benchmark_colours_are_data_options_of_shapes_captions(tmp_path):
    from nextstep.errors import ConfigError
    from nextstep.training.config import TrainConfig
    from nextstep.training.sources import open_source

    def config(sources: str) -> TrainConfig:
        path = tmp_path / "stage.toml"
        path.write_text(f"[data]\nsources = [{sources}]\n")
        return TrainConfig.from_file(path)

    source = config('{ kind = "shapes", raster_order = true }').data.sources[0]
    assert open_source(source, 0, "data.sources[0]", rank=0, world_size=1).config.raster_order
    with pytest.raises(ConfigError, match=r"data.sources\[0\].raster_order \(only for shapes captions, not edits\)"):
        config('{ kind = "shapes", edits = true, raster_order = true }').check()
    # benchmark_colours: the benchmark's colour naming per category (the world's rule names each colour
    # with chance 0.5), so every color_attr caption names both colours.
    named = open_source(config('{ kind = "shapes", benchmark_colours = true }').data.sources[0], 0, "s", rank=0,
                        world_size=1)
    assert named.config.colour_prob is None
    plain = open_source(config('{ kind = "shapes" }').data.sources[0], 0, "s", rank=0, world_size=1)
    assert plain.config.colour_prob == 0.5
    captions = [make_sample(named.config, i) for i in range(200)]
    attr = [c.caption for c in captions if c.category == "color_attr"]
    assert attr and all(sum(o.colour is not None for o in parse_caption(t).objects) == 2 for t in attr)
    with pytest.raises(ConfigError, match=r"data.sources\[0\].benchmark_colours \(only for shapes captions"):
        config('{ kind = "shapes", edits = true, benchmark_colours = true }').check()


@pytest.mark.parametrize("text", [
    "a circle", "a red circle", "an orange triangle", "a circle and a square",
    "a red circle and a blue square", "two circles", "four yellow triangles",
    "a circle to the left of a square", "an orange square below a green circle",
    "a triangle above a circle on a dark background", "three squares on a dark background",
])
def test_captions_round_trip(text):
    assert str(parse_caption(text)) == text


def test_caption_structure():
    assert parse_caption("three red squares on a dark background") == \
        Caption("count", (Phrase("square", "red"),) * 3, None, "dark")
    assert parse_caption("a circle to the right of a blue square") == \
        Caption("relation", (Phrase("circle"), Phrase("square", "blue")), "to the right of", "light")


@pytest.mark.parametrize("text, words", [
    ("a big circle", "'big'"), ("an circle", "'an' before 'orange'"), ("a orange circle", "'an' before"),
    ("two circle", "'circle'"), ("five circles", "'five'"), ("a circle and", "the end"),
    ("A circle", "lower case"), ("a circle on a blue background", "background"),
    ("a circle  and a square", "single spaces"), ("", "empty"), ("a circle near a square", "'near'"),
    ("a circle to the left a square", "'to' (word 3)"),
])
def test_unparseable_captions_are_rejected_with_the_reason(text, words):
    with pytest.raises(CaptionError) as e:
        parse_caption(text)
    assert words in str(e.value)


@pytest.mark.parametrize("text, edit", [
    ("make the red circle blue", Edit("recolour", Phrase("circle", "red"), colour="blue")),
    ("make the square orange", Edit("recolour", Phrase("square"), colour="orange")),
    ("add an orange triangle", Edit("add", Phrase("triangle", "orange"))),
    ("add a square", Edit("add", Phrase("square"))),
    ("remove the green square", Edit("remove", Phrase("square", "green"))),
    ("change the background to dark", Edit("background", background="dark")),
])
def test_instructions_round_trip(text, edit):
    assert parse_instruction(text) == edit and str(edit) == text


@pytest.mark.parametrize("text", ["make the circle", "remove a circle", "add the circle",
                                  "change the background to blue", "paint the circle red", "make the red blue"])
def test_bad_instructions_are_rejected(text):
    with pytest.raises(CaptionError, match="cannot parse instruction"):
        parse_instruction(text)


@pytest.mark.parametrize("size", [64, 128])
def test_checker_agrees_with_renderer(size):
    """100 seeded samples per category (the full 2,000 sweep is benchmarks/shapes_agreement.py)."""
    rates = {}
    for ci, cat in enumerate(CATEGORIES):
        counts = Counter()
        for k in range(100):
            rng = np.random.default_rng([size, ci, k])
            scene, cap = sample_scene(rng, size, cat, None, dark_prob=0.25)
            image = render_image(scene)
            counts["clean"] += check(image, str(cap)).passed
            counts["noisy"] += check(degrade(image, rng), str(cap)).passed
            bad, _ = corrupt(rng, scene, cap)
            counts["corrupt_fail"] += not check(render_image(bad), str(cap)).passed
        rates[cat] = counts
    for cat, c in rates.items():
        assert c["clean"] == 100, (cat, c)
        assert c["noisy"] >= 99, (cat, c)
        assert c["corrupt_fail"] >= 99, (cat, c)


def _scene(*objs, bg="light", size=64):
    return Scene(size, bg, tuple(SceneObject(s, c, b) for s, c, b in objs))


def test_checker_names_what_is_wrong():
    red_circle = ("circle", "red", (8, 8, 22, 22))
    blue_square = ("square", "blue", (40, 30, 54, 44))
    good = render_image(_scene(red_circle, blue_square))
    assert check(good, "a red circle and a blue square").passed
    assert check(good, "a red circle to the left of a blue square").passed
    assert check(good, "a circle above a square").passed
    cases = {
        "a green circle and a blue square": "not the objects",  # wrong colour
        "a red circle to the right of a blue square": "relation",  # wrong relation
        "a red circle": "found 2 objects",  # extra object
        "a red circle and a blue square and": None,  # unparseable -> CaptionError
        "three circles": "found 2 objects",  # wrong count
        "a red circle and a blue square on a dark background": "background",
        "a red triangle and a blue square": "not the objects",  # wrong shape
    }
    for caption, reason in cases.items():
        if reason is None:
            with pytest.raises(CaptionError):
                check(good, caption)
            continue
        result = check(good, caption)
        assert not result.passed and reason in result.reason, (caption, result.reason)
    only_circle = render_image(_scene(red_circle))
    assert "found 1 objects" in check(only_circle, "a red circle and a blue square").reason  # missing object


def test_detect_reports_boxes_colours_and_shapes():
    scene = _scene(("triangle", "yellow", (5, 5, 19, 19)), ("circle", "purple", (30, 40, 47, 57)),
                   ("square", "orange", (40, 4, 52, 16)), bg="dark")
    det = detect(render_image(scene))
    assert det.background == "dark"
    found = {(o.shape, o.colour, o.bbox) for o in det.objects}
    assert found == {(o.shape, o.colour, o.bbox) for o in scene.objects}
    triangle = next(o for o in det.objects if o.shape == "triangle")
    assert triangle.centre == (12.0, 12.0)  # the box centre, not the (lower) centroid


def test_checker_fails_off_palette_and_unknown_shapes():
    image = render(_scene(("square", "red", (10, 10, 24, 24))))
    image[10:24, 10:24] = (128, 128, 0)  # olive: not a palette colour
    assert "palette" in check(Image.fromarray(image), "a square").reason
    image = render(_scene())
    image[10:20, 10:40] = COLOURS["red"]  # an oblong: no shape of this world
    result = check(Image.fromarray(image), "a red square")
    assert not result.passed and "blob" in result.reason
    with pytest.raises(ValueError, match="square"):
        render(_scene(("square", "red", (10, 10, 40, 20))))


def test_checker_rejects_bad_images():
    with pytest.raises(ValueError, match="square"):
        check(Image.new("RGB", (64, 32)), "a circle")
    with pytest.raises(TypeError):
        check("image.png", "a circle")


def test_edit_checker_agrees_with_edit_renderer():
    counts = Counter()
    for k in range(120):
        rng = np.random.default_rng([99, k])
        src, edit, tgt = sample_edit(rng, 64)
        counts[edit.op] += 1
        s, t = render_image(src), render_image(tgt)
        assert check_edit(s, t, str(edit)).passed, (str(edit), src.labels(), tgt.labels())
        assert check_edit(degrade(s, rng), degrade(t, rng), str(edit)).passed
        bad, kind = corrupt_edit(rng, src, edit, tgt)
        assert not check_edit(s, render_image(bad), str(edit)).passed, kind
    assert set(counts) == {"recolour", "add", "remove", "background"}


def test_edit_checker_needs_a_unique_referent_and_untouched_objects():
    a = ("circle", "red", (6, 6, 20, 20))
    b = ("circle", "red", (40, 40, 54, 54))
    src = render_image(_scene(a, b))
    tgt = render_image(_scene(("circle", "blue", a[2]), b))
    result = check_edit(src, tgt, "make the red circle blue")
    assert not result.passed and "picks out 2" in result.reason
    src = render_image(_scene(a, ("square", "green", (40, 40, 54, 54))))
    moved = render_image(_scene(("circle", "blue", a[2]), ("square", "green", (30, 40, 44, 54))))
    assert not check_edit(src, moved, "make the circle blue").passed
    good = render_image(_scene(("circle", "blue", a[2]), ("square", "green", (40, 40, 54, 54))))
    assert check_edit(src, good, "make the circle blue").passed
    with pytest.raises(CaptionError):
        check_edit(src, good, "make it blue")


def test_corruptions_really_change_the_scene():
    rng = np.random.default_rng(3)
    kinds = Counter()
    for ci, cat in enumerate(CATEGORIES):
        for _ in range(40):
            scene, cap = sample_scene(rng, 64, cat)
            bad, kind = corrupt(rng, scene, cap)
            kinds[kind] += 1
            assert bad != scene
    assert set(kinds) == {"background", "missing", "extra", "shape", "colour", "swap_colours", "relation"}


def test_dataset_is_worker_safe_and_resumable():
    ds = ShapesDataset(size=64, seed=4)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    first = []
    for i, sample in enumerate(loader):
        ds.mark_consumed(sample)
        first.append(sample["key"])
        if i == 20:
            break
    assert len(set(first)) == len(first)
    state = json.loads(json.dumps(ds.state_dict()))  # a position survives JSON
    resumed = ShapesDataset(size=64, seed=4)
    resumed.load_state_dict(state)
    more = [s["key"] for _, s in zip(range(20), DataLoader(resumed, batch_size=None, num_workers=1))]
    assert not set(more) & set(first)
    assert sorted(int(k) for k in first + more) == list(range(41))
    s = make_sample(ds.config, 3)
    sample = next(iter(ds))
    assert sample["pixels"].shape == (3, 64, 64) and sample["pixels"].min() >= -1 and sample["pixels"].max() <= 1
    assert set(sample) >= {"key", "caption", "pixels", "labels", "category", "__meta__"}
    assert s.caption  # make_sample and the dataset agree on what sample k is
    assert next(iter(ShapesDataset(size=64, seed=4)))["caption"] == make_sample(ds.config, 0).caption


def test_dataset_ranks_take_disjoint_indices():
    keys = {r: [s["key"] for _, s in zip(range(10), ShapesDataset(seed=1, rank=r, world_size=2))] for r in (0, 1)}
    assert keys[0] == [f"{k:09d}" for k in range(0, 20, 2)]
    assert keys[1] == [f"{k:09d}" for k in range(1, 20, 2)]


def test_edit_dataset_yields_triplets():
    sample = next(iter(ShapesDataset(size=64, seed=2, edits=True)))
    assert sample["source"].shape == sample["target"].shape == (3, 64, 64)
    parse_instruction(sample["instruction"])


def test_cli_writes_a_folder_with_a_manifest(tmp_path):
    out = tmp_path / "shapes"
    assert main(["data", "shapes", "--out", str(out), "--num", "12", "--size", "64", "--seed", "3"]) == 0
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 12
    for line in lines:
        scene = Scene.from_labels(line["labels"])
        image = np.asarray(Image.open(out / line["file"]))
        assert (image == render(scene)).all()
        assert check(Image.open(out / line["file"]), line["caption"]).passed
    # The same seed makes the same data.
    again = tmp_path / "again"
    main(["data", "shapes", "--out", str(again), "--num", "12", "--size", "64", "--seed", "3"])
    assert (again / "manifest.jsonl").read_text() == (out / "manifest.jsonl").read_text()
    assert not list(out.glob(".*.tmp"))  # no temp files left behind


def test_cli_writes_edits_and_shards(tmp_path):
    out = tmp_path / "edits"
    assert main(["data", "shapes", "--out", str(out), "--num", "5", "--edits"]) == 0
    line = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert set(line) == {"source", "instruction", "target", "labels"}
    assert check_edit(Image.open(out / line["source"]), Image.open(out / line["target"]), line["instruction"]).passed
    shards = tmp_path / "shards"
    assert main(["data", "shapes", "--out", str(shards), "--num", "7", "--format", "webdataset",
                 "--shard-size", "3"]) == 0
    names = sorted(p.name for p in shards.iterdir())
    assert names == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar"]
    with tarfile.open(shards / "shapes-000000.tar") as tar:
        assert tar.getnames()[:3] == ["000000.png", "000000.txt", "000000.json"]


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path / "a"), "--num", "2", "--size", "50"]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    assert main(["data", "shapes", "--out", str(tmp_path / "a"), "--num", "0"]) == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    assert main(["data", "shapes", "--out", str(tmp_path / "full"), "--num", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["data", "shapes", "--out", str(tmp_path / "b"), "--num", "1", "--categories", "nope"]) == 2
    with pytest.raises(SystemExit):
        main(["data", "shapes", "--out", str(tmp_path / "c"), "--num", "1", "--dark-prob", "2"])


def test_labels_round_trip_and_bad_labels():
    scene = make_sample(ShapesConfig(seed=1), 0).scene
    assert Scene.from_labels(json.loads(json.dumps(scene.labels()))) == scene
    assert replace(scene, background="dark") != scene
    with pytest.raises(ValueError, match="labels"):
        Scene.from_labels({"size": 64})


def test_dataset_pixels_follow_the_reference_convention():
    # The reference's ToTensor + Normalize(0.5, 0.5), written out in torch.
    ds = ShapesDataset(size=64, seed=1)
    sample = next(iter(ds))
    image = torch.from_numpy(render(make_sample(ds.config, 0).scene))
    reference = image.permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
    assert sample["pixels"].dtype == torch.float32 and sample["pixels"].is_contiguous()
    assert torch.allclose(sample["pixels"], reference)


CORE_PACKAGES = ("nextstep.config", "nextstep.model", "nextstep.sampling", "nextstep.vae", "nextstep.text",
                 "nextstep.io", "nextstep.pipeline")


def _shapes_modules_after_importing(*modules: str) -> list[str]:
    """The nextstep.shapes modules loaded by importing `modules` in a fresh interpreter."""
    code = (f"import json, sys; import {', '.join(modules)}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[:2] == ['nextstep', 'shapes'])))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_core_packages_do_not_import_the_shapes_world():
    assert _shapes_modules_after_importing(*CORE_PACKAGES) == []


def test_serving_does_not_import_the_shapes_world():
    assert _shapes_modules_after_importing("nextstep.serving", "nextstep.pipeline") == []
