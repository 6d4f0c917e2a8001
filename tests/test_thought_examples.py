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
    assert keep_agreeing(manifest, out) == {"read": 3, "kept": 2}
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines[:2]


def test_keep_agreeing_refuses_paths_that_would_break_or_replace_the_manifest(tmp_path):
    manifest, _ = _manifest(tmp_path)
    with pytest.raises(ValueError, match="manifest itself"):
        keep_agreeing(manifest, manifest)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ValueError, match="relative"):
        keep_agreeing(manifest, tmp_path / "elsewhere" / "kept.jsonl")
    bad = tmp_path / "captions.jsonl"
    bad.write_text(json.dumps({"file": "images/0.png", "caption": "a red circle"}) + "\n")
    with pytest.raises(ValueError, match="captions.jsonl:1 has no 'file' and 'plan'"):
        keep_agreeing(bad, tmp_path / "kept.jsonl")


def test_main_writes_beside_each_manifest_and_keeps_what_exists(tmp_path, capsys):
    manifest, _ = _manifest(tmp_path)
    assert main([str(manifest)]) == 0
    out = tmp_path / "manifest-agrees.jsonl"
    assert len(out.read_text().splitlines()) == 2
    assert "kept 2 of 3" in capsys.readouterr().out
    out.write_text("mine\n")
    with pytest.raises(SystemExit):
        main([str(manifest)])
    assert out.read_text() == "mine\n"
