"""DPO post-training: the pair file, the Diffusion-DPO loss on the flow head, the stage, and the
preference-data command."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nextstep.data import Collator
from nextstep.shapes import render_image, scene_for_caption
from nextstep.shapes.grammar import parse_caption
from nextstep.text import THOUGHT_OPEN
from nextstep.training.dpo import dpo_loss, pair_draws, tokens_per_image, velocity_errors
from nextstep.training.preferences import PreferenceError, pair_batch, pairs_for, read_pair_files, read_pairs

SHIPPED = Path(__file__).resolve().parents[1] / "nextstep" / "assets" / "shapes"
# Chosen: the caption's scene; rejected: the same layout in another colour.
CAPTIONS = [("a red circle", "a blue circle"), ("a green square", "a yellow square"),
            ("a purple triangle", "an orange triangle"), ("two blue circles", "two red circles")]


def make_pair_file(folder: Path, size: int = 32, edit_source: bool = False) -> Path:
    """A pair file of shapes images (`size` px): for each caption, its scene against a wrong-coloured one."""
    lines = []
    for i, (good, bad) in enumerate(CAPTIONS):
        scene = scene_for_caption(np.random.default_rng(i), parse_caption(good), size)
        wrong = scene_for_caption(np.random.default_rng(i), parse_caption(bad), size)
        for name, s in (("chosen", scene), ("rejected", wrong)):
            render_image(s).save(folder / f"{i}_{name}.png")
        line = {"prompt": good, "chosen": f"{i}_chosen.png", "rejected": f"{i}_rejected.png", "score": [1, 0]}
        if edit_source and i % 2:
            render_image(wrong).save(folder / f"{i}_source.png")
            line = {**line, "prompt": f"make the {bad.split()[-2]} {bad.split()[-1].rstrip('s')} "
                                      f"{good.split()[-2]}", "source": f"{i}_source.png"}
        lines.append(json.dumps(line))
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_parts(ref10: Path, seed: int = 0):
    """A fresh tiny model (2 layers, hidden 32), the shapes tokenizer and the fixture's tiny VAE."""
    from nextstep.training.config import TrainConfig
    from nextstep.training.train import build_parts

    config = TrainConfig(seed=seed)
    config.model.vae = str(ref10 / "vae")
    config.model.tokenizer = str(SHIPPED)  # the shapes tokenizer, saved (building it takes 15 s)
    config.model.config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, fm_head_dim=32, fm_head_layers=2, max_position_embeddings=256)
    model, tokenizer, vae = build_parts(config, torch.device("cpu"))
    # init_weights zeroes the head's output: give it some velocity so errors differ between images.
    with torch.no_grad():
        torch.manual_seed(seed)
        model.image_head.net.final_layer.linear.weight.normal_(0, 0.02)
    return model, tokenizer, vae


def errors(model, vae, batch, step: int = 0, seed: int = 0):
    latents = vae.to_latents(torch.cat(batch["pixel_values"]), generator=torch.Generator().manual_seed(step),
                             sample=False)
    counts = [k for k, m in zip(tokens_per_image(model, latents), batch["latents_mask"].tolist()) if m]
    noise, t = pair_draws(batch["pairs"], counts, model.image_head.batch_mul, model.config.token_dim, seed, step)
    return velocity_errors(model, batch, latents, noise, t)


# ---------------------------------------------------------------------- the pair file
def test_pair_file_is_read_with_paths_relative_to_it(tmp_path):
    pairs = read_pairs(make_pair_file(tmp_path, edit_source=True))
    assert pairs[0].prompt == "a red circle" and len(pairs) == len(CAPTIONS)
    assert pairs[0].chosen == tmp_path / "0_chosen.png" and pairs[0].source is None
    assert pairs[1].source == tmp_path / "1_source.png" and pairs[1].line == 2
    # A step's pairs depend only on (seed, step): any split into slices gives the same pairs,
    # every epoch walks all pairs once, and epochs are shuffled differently.
    whole = pairs_for(4, 0, 1, 4, 0, 4)
    assert pairs_for(4, 0, 1, 4, 0, 2) + pairs_for(4, 0, 1, 4, 2, 2) == whole
    assert sorted(whole) == [0, 1, 2, 3]
    walk = [pairs_for(4, 0, s, 2, 0, 2) for s in range(8)]
    epochs = [walk[2 * e] + walk[2 * e + 1] for e in range(4)]
    assert all(sorted(e) == [0, 1, 2, 3] for e in epochs) and len({tuple(e) for e in epochs}) > 1


def test_pair_files_read_as_one_set_each_relative_to_its_folder(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, second = make_pair_file(tmp_path / "a"), make_pair_file(tmp_path / "b", edit_source=True)
    pairs = read_pair_files([first, second])
    assert len(pairs) == 2 * len(CAPTIONS)
    assert [p.prompt for p in pairs] == [p.prompt for p in read_pairs(first) + read_pairs(second)]
    assert all(p.chosen.parent == tmp_path / "a" for p in pairs[:len(CAPTIONS)])
    assert all(p.chosen.parent == tmp_path / "b" for p in pairs[len(CAPTIONS):])
    assert any(p.source is not None for p in pairs[len(CAPTIONS):])
    assert [p.index for p in pairs] == list(range(len(pairs)))  # no two pairs share their random draws


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a red circle", "chosen": "0_chosen.png"}', "missing ['rejected']"),
    ('{"prompt": "", "chosen": "0_chosen.png", "rejected": "0_rejected.png"}', "['prompt'] must be non-empty"),
    ('{"prompt": "x", "chosen": "nope.png", "rejected": "0_rejected.png"}', "chosen image"),
    ('{"prompt": "x", "chosen": "0_chosen.png", "rejected": "big.png"}', "chosen is 32x32 px but rejected 48x48"),
    ('{"prompt": "x", "chosen": "0_chosen.png", "rejected": "junk.png"}', "is not a readable image"),
    ('["a list"]', "expected a JSON object, got list"),
    ('{"prompt": "x", ', "not valid JSON"),
])
def test_a_bad_pair_file_is_named_line_by_line(tmp_path, line, message):
    make_pair_file(tmp_path)
    render_image(scene_for_caption(np.random.default_rng(0), parse_caption("a red circle"), 48)).save(
        tmp_path / "big.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a red circle", "chosen": "0_chosen.png", "rejected": "0_rejected.png"}\n'
                   f"{line}\n")
    with pytest.raises(PreferenceError, match="1 problem") as info:
        read_pairs(bad)
    assert f"{bad}:2" in str(info.value) and message in str(info.value)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PreferenceError, match="holds no pairs"):
        read_pairs(tmp_path / "empty.jsonl")
    with pytest.raises(PreferenceError, match="does not exist"):
        read_pairs(tmp_path / "none.jsonl")


def test_pair_batch_puts_chosen_rows_then_rejected_rows(tmp_path, ref10):
    _, tokenizer, _ = tiny_parts(ref10)
    pairs = read_pairs(make_pair_file(tmp_path, edit_source=True))
    batch = pair_batch(pairs[:2], Collator(tokenizer, caption_dropout=0.0))
    assert batch["keys"] == ["0:chosen", "1:chosen", "0:rejected", "1:rejected"] and batch["pairs"] == [0, 1]
    # Pair 1 is an edit: its source block is read, not scored.
    assert batch["latents_mask"].tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert torch.equal(batch["input_ids"][1], batch["input_ids"][3])  # same prompt, same image size


def test_a_pairs_thought_stands_between_prompt_and_image_in_both_rows(tmp_path, ref10):
    _, tokenizer, _ = tiny_parts(ref10)
    path = make_pair_file(tmp_path, edit_source=True)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    thought = "red circle center on white"
    lines[0]["thought"] = lines[1]["thought"] = thought
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    pairs = read_pairs(path)
    assert [p.thought for p in pairs] == [thought, thought, None, None]
    batch = pair_batch(pairs[:2], Collator(tokenizer, caption_dropout=0.0))
    enc = tokenizer.encode
    said = enc(THOUGHT_OPEN, plain=True) + enc(thought, plain=True) + [tokenizer.image_area_id]
    for row in range(4):  # the caption's (row 0) and the edit's (row 1), chosen and rejected alike
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert any(ids[k:k + len(said)] == said for k in range(len(ids))), row
    caption = enc("a red circle") + said
    assert batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()[:len(caption)] == caption
    lines[2]["thought"] = ""
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(PreferenceError, match=r"\['thought'\] must be non-empty"):
        read_pairs(path)


class ThinkingStub:
    """Draws image k of a prompt as a flat colour and thinks thought `thoughts[k]` (when thinking)."""

    def __init__(self, colours, thoughts):
        self.colours, self.thoughts = colours, thoughts

    def iter_generate(self, prompts, settings, seeds, n, sources, batch_images, progress):
        from PIL import Image

        for i, _ in enumerate(prompts):
            thinks = settings.thinks(edit=sources is not None)
            yield i, [Image.new("RGB", (32, 32), c) for c in self.colours], \
                list(self.thoughts) if thinks else [""] * n


def test_pairs_made_while_thinking_share_the_best_images_thought(tmp_path):
    from nextstep.settings import GenerationSettings
    from nextstep.training.preferences import make_pairs

    # redness: 255 red > 128 red > 0 red; the worst image overall (blue) thought otherwise.
    stub = ThinkingStub([(128, 0, 0), (255, 0, 0), (0, 0, 255), (0, 0, 0)], ["a", "b", "c", "b"])
    think = GenerationSettings(hw=(32, 32), think=True)
    summary = make_pairs(stub, ["a red circle"], [0], 4, think, redness, tmp_path / "t")
    (line,) = [json.loads(x) for x in (tmp_path / "t" / "pairs.jsonl").read_text().splitlines()]
    assert line["thought"] == "b" and line["seeds"] == [1, 3] and summary["pairs"] == 1
    assert read_pairs(tmp_path / "t" / "pairs.jsonl")[0].thought == "b"
    # Without thinking for this kind (think is text to image's), the worst of all images, no thought.
    make_pairs(stub, ["make it red"], [0], 4, think, redness, tmp_path / "e", sources=[None])
    (line,) = [json.loads(x) for x in (tmp_path / "e" / "pairs.jsonl").read_text().splitlines()]
    assert "thought" not in line and line["seeds"] == [1, 2]
    # A best image drawn after an empty thought makes no pair (a row cannot hold it), and is counted.
    empty = ThinkingStub([(128, 0, 0), (255, 0, 0)], ["a", ""])
    assert make_pairs(empty, ["a red circle"], [0], 2, think, redness, tmp_path / "x")["empty_thoughts"] == 1
    with pytest.raises(ValueError, match="true images were not drawn after a thought"):
        make_pairs(stub, ["a red circle"], [0], 4, think, redness, tmp_path / "y",
                   truths=[render_image(scene_for_caption(np.random.default_rng(0), parse_caption("a red circle"),
                                                          32))])


# ---------------------------------------------------------------------- the loss
def test_the_sft_term_adds_the_policys_error_on_the_chosen_image():
    """loss = softplus(beta * d) + w * e_policy(chosen): checked against the closed form, and its
    gradient reaches the chosen error only (by w more than plain DPO's)."""
    policy = torch.tensor([0.30, 0.10, 0.25, 0.40], requires_grad=True)  # chosen (2 pairs), then rejected
    reference = torch.tensor([0.28, 0.12, 0.20, 0.41])
    beta, w = 10.0, 3.0
    loss, _ = dpo_loss(policy, reference, beta, sft_weight=w)
    d = (policy[:2] - reference[:2]) - (policy[2:] - reference[2:])
    expected = torch.log1p(torch.exp(beta * d)) + w * policy[:2]
    assert torch.allclose(loss, expected, atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(loss.sum(), policy)
    (plain,) = torch.autograd.grad(dpo_loss(policy, reference, beta)[0].sum(), policy)
    assert torch.allclose(grad - plain, torch.tensor([w, w, 0.0, 0.0]), atol=1e-6, rtol=0)


def test_dpo_loss_at_initialisation_is_log_2(tmp_path, ref10):
    model, tokenizer, vae = tiny_parts(ref10)
    reference = copy.deepcopy(model).requires_grad_(False)
    batch = pair_batch(read_pairs(make_pair_file(tmp_path, edit_source=True)), Collator(tokenizer, 0.0))
    policy_err = errors(model, vae, batch)
    with torch.no_grad():
        ref_err = errors(reference, vae, batch)
    loss, stats = dpo_loss(policy_err, ref_err, beta=500.0)
    assert torch.equal(loss, torch.full((len(CAPTIONS),), math.log(2)))
    # Not trivially so: the errors themselves differ between chosen and rejected images.
    assert (stats["chosen_err"] - stats["rejected_err"]).abs().min() > 0
    assert loss.requires_grad


def test_dpo_gradient_moves_the_policy_toward_the_chosen_images(tmp_path, ref10):
    """A few DPO steps: at fresh noise, the policy's error on the chosen images falls relative to
    the rejected ones (measured against the reference), and the loss drops below log 2."""
    torch.manual_seed(0)
    model, tokenizer, vae = tiny_parts(ref10)
    reference = copy.deepcopy(model).requires_grad_(False)
    batch = pair_batch(read_pairs(make_pair_file(tmp_path)), Collator(tokenizer, 0.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def gap(step: int) -> tuple[float, float]:
        """Mean d = (policy - reference) on chosen minus the same on rejected, and the mean loss."""
        with torch.no_grad():
            loss, stats = dpo_loss(errors(model, vae, batch, step), errors(reference, vae, batch, step), 500.0)
        return float((stats["chosen_vs_ref"] - stats["rejected_vs_ref"]).mean()), float(loss.mean())

    held_out = 10_000  # noise and times no training step draws
    assert gap(held_out) == (0.0, pytest.approx(math.log(2)))
    for step in range(8):
        with torch.no_grad():
            ref_err = errors(reference, vae, batch, step)
        loss, _ = dpo_loss(errors(model, vae, batch, step), ref_err, 500.0)
        loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    d, loss = gap(held_out)
    assert d < 0 and loss < math.log(2) - 0.05, (d, loss)


# ---------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, ref10) -> Path:
    """A tiny model saved in the official layout: the `init_from` of the DPO stages below."""
    from nextstep import NextStepPipeline

    model, tokenizer, vae = tiny_parts(ref10)
    folder = tmp_path_factory.mktemp("tiny") / "export"
    NextStepPipeline(model.eval(), vae, tokenizer).save_pretrained(folder)
    return folder


def write_stage(folder: Path, init_from: Path, pairs: Path, out: str = "run", steps: int = 16, **dpo) -> Path:
    lines = [f'out_dir = "{folder / out}"', 'stage = "dpo"', f"steps = {steps}", "seed = 0",
             f'init_from = "{init_from}"', "[dpo]", f'pairs = "{pairs}"', "beta = 500.0",
             *(f"{k} = {json.dumps(v)}" for k, v in dpo.items()),
             "[data]", "batch_size = 4", "[optim]", "lr = 1e-3", "warmup_steps = 0", "grad_accum = 2",
             "[train]", "checkpoint_every = 5", "keep_last = 2", "tensorboard = false",
             "sample_settings = { hw = [32, 32], num_sampling_steps = 2 }"]
    path = folder / f"{out}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_dpo_stage_trains_and_resumes_bit_identically_after_sigkill(tmp_path, tiny_export):
    from .test_train import kill_mid_run, metrics, run_train

    pairs = make_pair_file(tmp_path, edit_source=True)
    from nextstep.training.config import TrainConfig
    from nextstep.training.train import train

    train(TrainConfig.from_file(write_stage(tmp_path, tiny_export, pairs, out="whole")))  # in-process: quicker
    done = metrics(tmp_path / "whole")
    assert len(done) == 16 and done[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert {"accuracy", "margin", "chosen_vs_ref", "rejected_vs_ref", "chosen_err", "rejected_err"} <= set(done[0])
    # The policy learns the preferences: late steps score the chosen images better than early ones.
    assert sum(m["loss"] for m in done[-4:]) / 4 < math.log(2) - 0.1
    assert (tmp_path / "whole" / "export" / "model.safetensors").is_file()

    cut = write_stage(tmp_path, tiny_export, pairs, out="cut")
    lines = kill_mid_run(cut, tmp_path / "cut", 8)  # mid-training, past a checkpoint
    assert 8 <= lines < 16, "the run was not interrupted mid-way"
    run_train(cut, "--resume")
    keys = [k for k in done[0] if k != "samples_per_s"]
    assert [[m[k] for k in keys] for m in metrics(tmp_path / "cut")] == [[m[k] for k in keys] for m in done]


@pytest.mark.parametrize("text,message", [
    ("", "dpo.pairs is empty"),
    ('[dpo]\npairs = "/no/pairs.jsonl"\n', "dpo.pairs='/no/pairs.jsonl' does not exist"),
    ('[dpo]\npairs = ["PAIRS", "/no/pairs.jsonl"]\n', "dpo.pairs='/no/pairs.jsonl' does not exist"),
    ('[dpo]\npairs = []\n', "dpo.pairs is empty"),
    ('[dpo]\npairs = "PAIRS"\nbeta = 0.0\n', "dpo.beta=0.0 (must be a number > 0)"),
    ('[dpo]\npairs = "PAIRS"\nsft_weight = -1.0\n', "dpo.sft_weight=-1.0 (must be a number >= 0)"),
])
def test_bad_dpo_config_fails_before_any_compute(tmp_path, tiny_export, text, message):
    from nextstep.errors import ConfigError
    from nextstep.training.config import TrainConfig

    path = tmp_path / "bad.toml"
    pairs = make_pair_file(tmp_path)
    path.write_text(f'stage = "dpo"\ninit_from = "{tiny_export}"\n' + text.replace("PAIRS", str(pairs)))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig.from_file(path).check()
    path.write_text(f'stage = "dpo"\n[dpo]\npairs = "{pairs}"\n')
    with pytest.raises(ConfigError, match="needs init_from"):
        TrainConfig.from_file(path).check()
    path.write_text('stage = "sft"\n[dpo]\nbeta = 10.0\n')
    with pytest.raises(ConfigError, match=r"\[dpo\] is set but stage='sft' does not read it"):
        TrainConfig.from_file(path).check()


# ---------------------------------------------------------------------- nextstep data preferences
def redness(images, prompts, sources) -> list[float]:
    """A toy reward (`--reward tests.test_dpo:redness`): how red an image is on average, in [0, 1]."""
    return [float(np.asarray(im, dtype=np.float32)[..., 0].mean() / 255) for im in images]


def test_data_preferences_pairs_the_best_sample_against_the_worst(tmp_path, tiny_export, capsys):
    from nextstep.cli import main

    out = tmp_path / "prefs"
    args = ["data", "preferences", "--model", str(tiny_export), "--out", str(out), "--num", "3", "-n", "3",
            "--size", "32", "--steps", "2", "--cfg", "1", "--reward", "tests.test_dpo:redness"]
    assert main(args) == 0
    assert "3 pairs from 3 prompts (9 images" in capsys.readouterr().out
    lines = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    pairs = read_pairs(out / "pairs.jsonl")
    assert [p.prompt for p in pairs] == [x["prompt"] for x in lines] and all(p.source is None for p in pairs)
    for line, pair in zip(lines, pairs):
        from PIL import Image

        best, worst = line["scores"]
        assert best > worst and line["category"]
        # The files are the images that were scored (PNG is lossless).
        assert redness([Image.open(pair.chosen)], [], []) == [best]
        assert redness([Image.open(pair.rejected)], [], []) == [worst]
    # The file is a function of the model, the options and the seed.
    first = (out / "pairs.jsonl").read_text()
    assert main(args) == 2 and "already holds pairs.jsonl" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0 and (out / "pairs.jsonl").read_text() == first
    assert main(args[:-2] + ["-n", "1"]) == 2 and "-n must be >= 2" in capsys.readouterr().err
    # Edits: each pair carries its rendered source.
    edits = tmp_path / "edits"
    assert main(args[:5] + [str(edits)] + args[6:] + ["--edits"]) == 0
    lines = [json.loads(x) for x in (edits / "pairs.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(p.source is not None for p in read_pairs(edits / "pairs.jsonl"))
    for line in lines:
        assert (edits / line["source"]).is_file() and line["kind"] in ("recolour", "add", "remove", "background")
        assert line["scores"][0] > line["scores"][1]


def test_data_preferences_draws_prompts_as_the_benchmark_names_colours(tmp_path, tiny_export):
    from nextstep.cli import main

    def prompts(*extra: str) -> list[str]:
        out = tmp_path / "-".join(extra)
        assert main(["data", "preferences", "--model", str(tiny_export), "--out", str(out), "--num", "6", "-n", "2",
                     "--size", "32", "--steps", "2", "--cfg", "1", "--reward", "tests.test_dpo:redness",
                     "--categories", "color_attr", "two_object", *extra]) == 0
        return [json.loads(x)["prompt"] for x in (out / "pairs.jsonl").read_text().splitlines()]

    # color_attr names both colours, two_object none; the world's own rule names each with chance 0.5.
    def named(caption: str) -> int:
        return sum(o.colour is not None for o in parse_caption(caption).objects)
    bench = prompts("--benchmark-colours")
    assert len(bench) == 6 and all(named(c) in (0, 2) for c in bench) and {named(c) for c in bench} == {0, 2}
    assert {named(c) for c in prompts("--colour-prob", "1")} == {2}


def test_data_preferences_with_chosen_truth_pairs_the_rendered_scene_against_the_worst_sample(tmp_path,
                                                                                              tiny_export):
    from PIL import Image

    from nextstep.cli import main
    from nextstep.shapes.dataset import ShapesConfig, make_sample

    def lines(out: Path, *extra: str) -> list[dict]:
        assert main(["data", "preferences", "--model", str(tiny_export), "--out", str(out), "--num", "3",
                     "--size", "32", "--steps", "2", "--cfg", "1", "--seed", "4", "--chosen", "truth",
                     *extra]) == 0
        return [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]

    # With a reward below 1 for every image (redness), every prompt gives a pair, one sample will do.
    got = lines(tmp_path / "t2i", "-n", "1", "--reward", "tests.test_dpo:redness")
    assert len(got) == 3
    for i, line in enumerate(got):
        scene = make_sample(ShapesConfig(size=32, seed=4), i).scene
        assert np.array_equal(np.asarray(Image.open(tmp_path / "t2i" / line["chosen"])),
                              np.asarray(render_image(scene)))
        assert line["scores"][0] == 1.0 and line["scores"][1] < 1.0 and line["seeds"] == [None, 4 + i]
    # Edits: the chosen image is the rendered target. With the shapes checker, only failed samples pair.
    edits = lines(tmp_path / "edits", "-n", "2", "--edits")
    assert edits  # an untrained model fails some
    for line in edits:
        i = int(Path(line["chosen"]).name[:6])
        target = make_sample(ShapesConfig(size=32, seed=4, edits=True), i).scene
        assert np.array_equal(np.asarray(Image.open(tmp_path / "edits" / line["chosen"])),
                              np.asarray(render_image(target)))
        assert line["scores"][1] < 1.0 and (tmp_path / "edits" / line["source"]).is_file()


# ---------------------------------------------------------------------- nextstep data thoughts
def test_data_thoughts_keeps_each_captions_best_image_with_the_thought_it_was_drawn_after(tmp_path, tiny_export,
                                                                                          capsys):
    """Each caption's best image is written with its thought, and it is the image the model draws after that
    thought from its seed; a caption whose best image scores below --min-score gives no example; the
    manifest is a text-to-image source whose rows carry the thoughts as plans."""
    from PIL import Image

    from nextstep import NextStepPipeline
    from nextstep.cli import main
    from nextstep.data import JsonlDataset

    out = tmp_path / "thoughts"
    args = ["data", "thoughts", "--model", str(tiny_export), "--out", str(out), "--num", "3", "-n", "2",
            "--size", "32", "--steps", "2", "--cfg", "1", "--reward", "tests.test_dpo:redness", "--min-score", "0",
            "--text-temperature", "1", "--thought-max-tokens", "4", "--seed", "5"]
    assert main(args) == 0
    assert "3 examples from 3 captions (6 images" in capsys.readouterr().out
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    pipe = NextStepPipeline.from_pretrained(str(tiny_export))
    settings = pipe.settings.with_overrides(hw=(32, 32), num_sampling_steps=2, cfg=1.0, think=True,
                                            text_temperature=1.0, thought_max_tokens=4)
    for line in lines:
        saved = Image.open(out / line["file"])
        assert redness([saved], [], []) == [line["score"]] and line["plan"].strip() and line["category"]
        [(_, [again], _)] = pipe.iter_generate([line["caption"]], settings, [line["seed"]], 1,
                                               thoughts=[[line["plan"]]])
        # Drawn alone, not in a batch of 6: the same image up to float rounding (a level or two of a pixel).
        diff = np.abs(np.asarray(again, dtype=np.int16) - np.asarray(saved, dtype=np.int16))
        assert diff.max() <= 2
    samples = [s for s in JsonlDataset(out / "manifest.jsonl", resolution=32, shuffle=False)
               if "caption" in s]
    assert sorted(s["plan"] for s in samples) == sorted(x["plan"] for x in lines)
    # Nothing scores 2: no examples, and the file says so.
    assert main(args + ["--min-score", "2", "--overwrite"]) == 0
    assert "0 examples from 3 captions" in capsys.readouterr().out
    assert (out / "manifest.jsonl").read_text() == ""
    assert main(args) == 2 and "already holds manifest.jsonl" in capsys.readouterr().err
