"""keep_agreeing: the thought examples whose image shows its thought."""

import json

import pytest

from nextstep.shapes.dataset import ShapesConfig, make_sample
from nextstep.shapes.renderer import render_image
from nextstep.training.thought_examples import keep_agreeing, main


def _manifest(tmp_path):
    """Three examples: two images with their own plans, one image with another scene's plan."""
    config = ShapesConfig(size=64, seed=3, plan_prob=1.0)
    samples = [make_sample(config, i) for i in range(3)]
    assert len({s.plan for s in samples}) == 3
    (tmp_path / "images").mkdir()
    lines = []
    for i, s in enumerate(samples):
        render_image(s.scene).save(tmp_path / "images" / f"{i}.png")
        plan = samples[(i + 1) % 3].plan if i == 2 else s.plan  # the third shows another scene's plan
        lines.append({"file": f"images/{i}.png", "caption": s.caption, "plan": plan, "score": 1.0})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest, lines


def test_keep_agreeing_drops_an_image_that_shows_another_thought(tmp_path):
    manifest, lines = _manifest(tmp_path)
    out = tmp_path / "kept.jsonl"
    assert keep_agreeing(manifest, out) == {"read": 3, "kept": 2, "relabelled": 0}
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines[:2]


def test_relabel_gives_an_image_the_plan_it_shows_where_that_plan_fits_its_caption(tmp_path):
    from nextstep.shapes.plan import plan_text

    manifest, lines = _manifest(tmp_path)
    scenes = [make_sample(ShapesConfig(size=64, seed=3, plan_prob=1.0), i).scene for i in range(3)]
    out = tmp_path / "relabelled.jsonl"
    assert keep_agreeing(manifest, out, relabel=True) == {"read": 3, "kept": 2, "relabelled": 1}
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got[:2] == lines[:2]
    assert got[2] == {**lines[2], "plan": plan_text(scenes[2]), "drawn_after": lines[2]["plan"]}
    # An image whose own plan does not fit its caption is dropped even when relabelling.
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[2]["caption"] = "four squares on a dark background"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert keep_agreeing(manifest, out, relabel=True) == {"read": 3, "kept": 2, "relabelled": 0}


def test_keep_agreeing_refuses_paths_that_would_break_or_replace_the_manifest(tmp_path):
    manifest, _ = _manifest(tmp_path)
    with pytest.raises(ValueError, match="manifest itself"):
        keep_agreeing(manifest, manifest)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ValueError, match="relative"):
        keep_agreeing(manifest, tmp_path / "elsewhere" / "kept.jsonl")
    bad = tmp_path / "captions.jsonl"
    bad.write_text(json.dumps({"file": "images/0.png", "caption": "a red circle"}) + "\n")  # no plan
    with pytest.raises(ValueError, match="captions.jsonl:1 has no 'file', 'caption' and 'plan'"):
        keep_agreeing(bad, tmp_path / "kept.jsonl")


def test_main_writes_beside_each_manifest_and_keeps_what_exists(tmp_path, capsys):
    manifest, _ = _manifest(tmp_path)
    assert main([str(manifest)]) == 0
    out = tmp_path / "manifest-agrees.jsonl"
    assert len(out.read_text().splitlines()) == 2
    assert "of 3 examples, 2 kept" in capsys.readouterr().out
    out.write_text("mine\n")
    with pytest.raises(SystemExit):
        main([str(manifest)])
    assert out.read_text() == "mine\n"


class _Settings:
    def thinks(self, edit: bool) -> bool:
        return True


class _Pipe:
    """Draws, for every caption, the first scene after a thought that is the second scene's plan and
    the second scene after its own plan."""

    def __init__(self, samples):
        self.samples = samples

    def iter_generate(self, prompts, settings, seeds, n, thoughts, batch_images, progress):
        a, b = self.samples
        for i in range(len(prompts)):
            yield i, [render_image(a.scene), render_image(b.scene)], [b.plan, b.plan]


def test_make_thought_examples_with_agrees_keeps_the_image_that_shows_its_thought(tmp_path):
    from nextstep.shapes.plan import image_agrees_with_thought
    from nextstep.training.thought_examples import make_thought_examples

    config = ShapesConfig(size=64, seed=3, plan_prob=1.0)
    samples = [make_sample(config, i) for i in range(2)]

    def reward(images, prompts, sources):
        return [1.0, 0.5]  # the image that does not show its thought scores higher

    for agrees, kept_seed in ((None, 10), (image_agrees_with_thought, 11)):
        out = tmp_path / str(kept_seed)
        summary = make_thought_examples(_Pipe(samples), ["a caption"], [10], 2, _Settings(), reward, out,
                                        min_score=0.5, agrees=agrees)
        [line] = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
        assert summary["examples"] == 1 and line["seed"] == kept_seed and line["plan"] == samples[1].plan
    # No image shows its thought above min_score: no example.
    out = tmp_path / "none"
    make_thought_examples(_Pipe(samples), ["a caption"], [10], 2, _Settings(), reward, out, min_score=0.6,
                          agrees=image_agrees_with_thought)
    assert (out / "manifest.jsonl").read_text() == ""
