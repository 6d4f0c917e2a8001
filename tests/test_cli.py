"""The command line (`nextstep generate | edit | eval`), the shipped-model default, and `pipe(...)`.

The tiny fixture model has random weights, so its images are noise: these tests
check mechanics (file names, counts, sizes, reports, determinism, errors), not
quality. The model is copied into the shipped layout (VAE in `vae/`) with a
`generation_defaults.json` that makes 64 px images in 4 steps, which keeps every
run to a fraction of a second.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nextstep.devices as devices
import nextstep.pipeline as pipeline_module
from nextstep.cli import main
from nextstep.errors import CheckpointError
from nextstep.pipeline import NextStepPipeline
from nextstep.sampling.requests import merge_requests
from nextstep.settings import GenerationSettings
from nextstep.training.think_default import load_at_defaults
from nextstep.text import with_image_tag
from nextstep.shapes import (
    CATEGORIES,
    EDIT_OPS,
    Scene,
    SceneObject,
    parse_caption,
    parse_instruction,
    render_image,
    scene_for_caption,
)
from nextstep.shapes.benchmark import (
    FAIL,
    PASS,
    benchmark_edit_cases,
    benchmark_prompts,
    format_table,
    run_edits_benchmark,
    run_shapes_benchmark,
)
from nextstep.shapes.plan import parse_plan, plan_text

DEFAULTS = {"cfg": 3.0, "cfg_img": 1.5, "num_sampling_steps": 4, "hw": [64, 64], "use_norm": False,
            "sampler": "euler_maruyama"}


@pytest.fixture(scope="session")
def model(ref10: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny fixture model in the shipped layout, with generation defaults."""
    folder = tmp_path_factory.mktemp("shipped") / "shapes"
    shutil.copytree(ref10 / "model", folder)
    shutil.copytree(ref10 / "vae", folder / "vae")
    (folder / "generation_defaults.json").write_text(json.dumps(DEFAULTS))
    return folder


@pytest.fixture(scope="session")
def pipe(model: Path) -> NextStepPipeline:
    return NextStepPipeline.from_pretrained(model)


@pytest.fixture()
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder (also the cwd), so default output names land here."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def source_image(size: int = 64) -> Image.Image:
    """A red circle and a blue square (boxes laid out for 64 px, scaled to `size`)."""
    k = size // 16
    scene = Scene(size, "light", (SceneObject("circle", "red", (2 * k, 2 * k, 6 * k, 6 * k)),
                                  SceneObject("square", "blue", (9 * k, 9 * k, 13 * k, 13 * k))))
    return render_image(scene)


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ---------------------------------------------------------------------- help
@pytest.mark.parametrize("command", [[], ["generate"], ["edit"], ["eval"], ["eval", "shapes"], ["eval", "edits"],
                                     ["serve"]])
def test_help(command: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(command + ["--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: nextstep")


# ---------------------------------------------------------------------- shipped model and defaults
def test_shipped_model_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(pipeline_module, "SHIPPED_MODEL", tmp_path / "not-here")
    with pytest.raises(CheckpointError, match="the shipped model is not installed at .*not-here"):
        NextStepPipeline.from_pretrained()


def test_shipped_model_is_the_default(monkeypatch: pytest.MonkeyPatch, model: Path) -> None:
    monkeypatch.setattr(pipeline_module, "SHIPPED_MODEL", model)
    pipe = NextStepPipeline.from_pretrained()
    assert pipe.default_size == (64, 64)
    assert pipe.settings.num_sampling_steps == 4 and pipe.settings.cfg == 3.0


def test_official_defaults_without_file(ref10: Path) -> None:
    pipe = NextStepPipeline.from_pretrained(ref10 / "model", ref10 / "vae")
    assert pipe.default_size == (256, 256)  # latent_size 32 * the VAE's factor 8
    assert pipe.settings == GenerationSettings(hw=(256, 256), sampler="euler_maruyama")  # the family's sampler


def test_bad_generation_defaults(model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    (folder / "generation_defaults.json").write_text(json.dumps({"cfg": 3.0, "guidance": 2}))
    with pytest.raises(CheckpointError, match=r"generation_defaults.json: unknown keys \['guidance'\]"):
        NextStepPipeline.from_pretrained(folder)
    (folder / "generation_defaults.json").write_text(json.dumps({"hw": [64]}))
    with pytest.raises(CheckpointError, match=r"hw=\(64,\) \(must be \(height, width\)"):
        NextStepPipeline.from_pretrained(folder)
    (folder / "generation_defaults.json").write_text(json.dumps({"context_noise": 0.5}))
    with pytest.raises(CheckpointError, match="context_noise is now context_noise_std"):
        NextStepPipeline.from_pretrained(folder)
    (folder / "generation_defaults.json").write_text(json.dumps({"context_noise_std": -0.5, "cfg": 0.5}))
    with pytest.raises(CheckpointError, match=r"cfg=0.5 \(must be a number >= 1\); "
                                              r"context_noise_std=-0.5 \(must be a number >= 0\)"):
        NextStepPipeline.from_pretrained(folder)


def test_context_noise_reaches_the_decoder_not_the_image(pipe: NextStepPipeline) -> None:
    """Each sampled token is read back with noise, but the image gets the clean token: the first
    token (sampled before anything is read back) is unchanged, later ones differ, and a seed
    still fixes everything, alone or merged into a batch with another request."""
    plain = pipe.settings.with_overrides(hw=(64, 64), cfg=3.0, num_sampling_steps=4)
    settings = plain.with_overrides(context_noise_std=0.5)
    clean = pipe.sample_tokens(pipe.prepare("a red circle", None, 1, 5, plain))
    req = pipe.prepare("a red circle", None, 1, 5, settings)
    noisy = pipe.sample_tokens(req)
    assert req.context_noise.shape == (16, 1, pipe.model.config.token_dim)
    assert abs(float(req.context_noise.std()) - 0.5) < 0.05
    assert torch.equal(noisy[:, 0], clean[:, 0]) and not torch.allclose(noisy[:, 1:], clean[:, 1:])
    assert torch.equal(pipe.sample_tokens(pipe.prepare("a red circle", None, 1, 5, settings)), noisy)
    other = pipe.prepare("a red circle", None, 1, 6, settings)
    merged = pipe.sample_tokens(merge_requests([req, other]))
    assert torch.allclose(merged[:1], noisy, atol=1e-5)
    with pytest.raises(ValueError, match="differ in context noise"):
        merge_requests([req, pipe.prepare("a red circle", None, 1, 5, plain)])
    with pytest.raises(ValueError, match=r"context_noise_std=-1.0 \(must be a number >= 0\)"):
        plain.with_overrides(context_noise_std=-1.0)


def test_edit_prompts_put_the_source_where_the_model_was_trained_to_see_it(model: Path, tmp_path: Path) -> None:
    assert with_image_tag("make the red circle blue") == "<image>make the red circle blue"
    assert with_image_tag("make the red circle blue", "last") == "make the red circle blue<image>"
    assert with_image_tag("turn <image> blue", "last") == "turn <image> blue"  # a placed tag stays
    with pytest.raises(ValueError, match="source image place"):
        with_image_tag("x", "middle")
    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    defaults = json.loads((folder / "generation_defaults.json").read_text())
    (folder / "generation_defaults.json").write_text(json.dumps({**defaults, "source_image": "last"}))
    assert NextStepPipeline.from_pretrained(folder).edit_prompt("remove the circle") == "remove the circle<image>"
    (folder / "generation_defaults.json").write_text(json.dumps({**defaults, "source_image": "middle"}))
    with pytest.raises(CheckpointError, match="source_image='middle' \\(must be one of"):
        NextStepPipeline.from_pretrained(folder)


def test_a_model_may_ask_for_bf16_mixed_on_cpus(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    defaults = json.loads((folder / "generation_defaults.json").read_text())
    (folder / "generation_defaults.json").write_text(json.dumps({**defaults, "cpu_dtype": "bf16-mixed"}))
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    pipe = NextStepPipeline.from_pretrained(folder, device="cpu")
    assert pipe.autocast_dtype == torch.bfloat16 and pipe.model.embed_tokens.weight.dtype == torch.float32
    assert NextStepPipeline.from_pretrained(folder, device="cpu", dtype="float32").autocast_dtype is None
    # The training streams' loader (think_default, stream_rule) takes the defaults' cpu_dtype as users do.
    assert load_at_defaults(folder, {"cpu_dtype": "bf16-mixed"}).autocast_dtype == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)  # emulated bf16 would be slower
    assert NextStepPipeline.from_pretrained(folder, device="cpu").autocast_dtype is None
    assert load_at_defaults(folder, {"cpu_dtype": "bf16-mixed"}).autocast_dtype is None
    assert devices.resolve("cpu", "bf16-mixed") == (torch.device("cpu"), torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown dtype 'bf17'"):
        devices.resolve("cpu", "bf16".replace("6", "7"))


def test_save_pretrained_keeps_defaults(pipe: NextStepPipeline, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path / "copy")
    assert NextStepPipeline.from_pretrained(tmp_path / "copy").settings == pipe.settings


# ---------------------------------------------------------------------- pipe(...)
def same(a: list[Image.Image], b: list[Image.Image]) -> bool:
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def close(a: list[Image.Image], b: list[Image.Image]) -> bool:
    """The same images up to one level: float32 matmuls may round differently at another batch
    size (pipe(...) batches its images; generate_image makes one alone)."""
    return len(a) == len(b) and all(np.abs(np.asarray(x, np.int16) - np.asarray(y)).max() <= 1 for x, y in zip(a, b))


def test_call_gives_image_k_the_image_of_seed_plus_k(pipe: NextStepPipeline) -> None:
    """pipe(...) image k of every prompt is generate_image's lone image of seed + k (same settings)."""
    out = pipe(["a red circle", "two squares"], num_images_per_prompt=2, generator=torch.Generator().manual_seed(7))
    assert len(out.images) == 4 and all(im.size == (64, 64) for im in out.images)
    expected = [pipe.generate_image(p, seed=7 + k, progress=False)[0]
                for p in ["a red circle", "two squares"] for k in range(2)]
    explicit = pipe.generate_image("two squares", hw=(64, 64), cfg=3.0, num_sampling_steps=4, seed=8,
                                   sde_type="euler_maruyama", progress=False)
    assert same(expected[3:], explicit)  # generate_image's unset arguments are the model's defaults
    assert close(out.images, expected)
    assert same(pipe(["a red circle", "two squares"], num_images_per_prompt=2, generator=7).images, out.images)
    assert same(pipe("two squares", generator=8).images, expected[3:])  # alone, image 1's seed
    other = pipe("a red circle", generator=8, height=32, width=48, num_inference_steps=2, guidance_scale=1.0)
    assert other.images[0].size == (48, 32)
    assert not same(pipe("a red circle", generator=8).images, expected[:1])


def test_call_edit(pipe: NextStepPipeline) -> None:
    src = source_image(32)
    out = pipe("make the circle blue", image=src, generator=3, num_images_per_prompt=2)
    assert len(out.images) == 2 and out.images[0].size == (32, 32)  # the source's size
    expected = [pipe.generate_image("<image>make the circle blue", src, 1, hw=(32, 32), cfg=3.0, cfg_img=1.5,
                                    num_sampling_steps=4, seed=3 + k, sde_type="euler_maruyama", progress=False)[0]
                for k in range(2)]
    assert close(out.images, expected)


def test_call_bad_arguments(pipe: NextStepPipeline) -> None:
    with pytest.raises(TypeError, match="generator must be"):
        pipe("a circle", generator="7")
    with pytest.raises(ValueError, match="image_guidance_scale guides by a source image"):
        pipe("a circle", image_guidance_scale=2.0)
    with pytest.raises(TypeError, match="unknown generation setting"):
        pipe("a circle", guidance=2.0)


# ---------------------------------------------------------------------- generate
def test_generate_single(model: Path, work: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["generate", "a red circle", "--model", model, "-o", "one.png"], capsys)
    assert code == 0 and files(work) == {"one.png"} and out.split() == ["one.png"]
    assert Image.open(work / "one.png").size == (64, 64)  # the model's default size

    code, _, err = run_cli(["generate", "a red circle", "--model", model, "-o", "many.png", "-n", "3",
                            "--size", "48x32"], capsys)
    assert code == 0 and "48 px wide and 32 px high (WIDTHxHEIGHT" in err
    assert files(work) == {"one.png", "many_0.png", "many_1.png", "many_2.png", "many_sheet.png"}
    assert Image.open(work / "many_0.png").size == (48, 32)
    assert Image.open(work / "many_sheet.png").size == (3 * 48 + 2 * 4, 32)  # side by side, 4 px gaps


def test_generate_batch(model: Path, work: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [{"id": "a", "caption": "a red circle"}, {"id": 7, "caption": "two squares"},
            {"id": "c-1", "caption": "a circle above a square"}]
    (work / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    code, _, _ = run_cli(["generate", "--prompts", "prompts.jsonl", "--out-dir", "out", "-n", "2",
                          "--batch-size", "2", "--model", model], capsys)
    assert code == 0  # the missing --out-dir was created
    assert files(work / "out") == {f"{i}_{k}.png" for i in ("a", "7", "c-1") for k in ("0", "1", "sheet")}
    # Image k of every line is the image of its seed + k (here the default seed), as in a single run.
    run_cli(["generate", "a red circle", "-n", "2", "-o", "single.png", "--model", model], capsys)
    for k in range(2):
        assert same([Image.open(work / "out" / f"a_{k}.png")], [Image.open(work / f"single_{k}.png")])

    # A line may carry its own seed; the same caption and seed give the same image.
    rows = [{"id": "s", "caption": "two squares", "seed": 9}, {"id": "t", "caption": "two squares", "seed": 9},
            {"id": "u", "caption": "two squares"}]
    (work / "seeded.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run_cli(["generate", "--prompts", "seeded.jsonl", "--out-dir", "out1", "--model", model], capsys)
    assert files(work / "out1") == {"s_0.png", "t_0.png", "u_0.png"}  # no sheet for one image
    run_cli(["generate", "two squares", "--seed", "9", "-o", "nine.png", "--model", model], capsys)
    s_, t_, u_, nine = (Image.open(work / p) for p in ("out1/s_0.png", "out1/t_0.png", "out1/u_0.png", "nine.png"))
    # (nine.png is made alone, s in a call of three: float32 matmuls may round differently, see `close`)
    assert same([s_], [t_]) and close([s_], [nine]) and not same([s_], [u_])


def test_every_settings_flag_reaches_the_model(model: Path, work: Path, capsys: pytest.CaptureFixture) -> None:
    run_cli(["generate", "a red circle", "--model", model, "-o", "plain.png"], capsys)
    flags = [["--cfg", "5"], ["--steps", "6"], ["--shift", "3"], ["--sampler", "ode"], ["--noise-level", "0.3",
             "--sampler", "sde"], ["--use-norm"], ["--cfg-schedule", "linear"], ["--context-noise-std", "0.5"],
             ["--negative-prompt", "a square"], ["--positive-prompt", "on a dark background"]]
    for i, flag in enumerate(flags):
        code, _, _ = run_cli(["generate", "a red circle", "--model", model, "-o", f"f{i}.png", *flag], capsys)
        assert code == 0 and not same([Image.open(work / "plain.png")], [Image.open(work / f"f{i}.png")]), flag
    # --noise-level moves the sde sampler's images, not just the change of sampler
    run_cli(["generate", "a red circle", "--model", model, "-o", "sde.png", "--sampler", "sde"], capsys)
    assert not same([Image.open(work / "sde.png")], [Image.open(work / "f4.png")])


# ---------------------------------------------------------------------- edit
def test_edit_single(model: Path, work: Path, capsys: pytest.CaptureFixture) -> None:
    source_image(128).save(work / "src.png")  # not the model's size: resized to 64
    code, out, _ = run_cli(["edit", "--image", "src.png", "make the circle blue", "-o", "e.png",
                            "--model", model, "--cfg-img", "2", "--seed", "1"], capsys)
    assert code == 0 and out.split() == ["e.png"]
    assert Image.open(work / "e.png").size == (64, 64)
    code, _, _ = run_cli(["edit", "--image", "src.png", "remove the square", "-o", "f.png", "-n", "2",
                          "--model", model], capsys)
    assert code == 0 and {"f_0.png", "f_1.png", "f_sheet.png"} <= files(work)


def test_edit_batch(model: Path, work: Path, capsys: pytest.CaptureFixture) -> None:
    (work / "jobs" / "img").mkdir(parents=True)
    source_image().save(work / "jobs" / "img" / "s.png")
    rows = [{"id": "x", "image": "img/s.png", "instruction": "make the circle blue"},
            {"id": "y", "image": "img/s.png", "instruction": "<image> add a green triangle"}]
    (work / "jobs" / "edits.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (work / "out").mkdir()
    code, _, _ = run_cli(["edit", "--prompts", "jobs/edits.jsonl", "--out-dir", "out", "-n", "2",
                          "--model", model], capsys)
    assert code == 0
    assert files(work / "out") == {f"{i}_{k}.png" for i in "xy" for k in ("0", "1", "sheet")}


# ---------------------------------------------------------------------- eval
def test_eval_shapes(model: Path, work: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["eval", "shapes", "--model", model, "--per-category", "2", "-n", "1"], capsys)
    assert code == 0
    report = json.loads((work / "eval" / "shapes" / "report.json").read_text())
    assert list(report["categories"]) == list(CATEGORIES)
    for name, c in report["categories"].items():
        assert (c["prompts"], c["images"]) == (2, 2) and 0 <= c["passed"] <= 2 and c["score"] == c["passed"] / 2
        assert all(len(case["passed"]) == 1 and len(case["reasons"]) == 1 for case in c["cases"])
        assert name in out
        grid = Image.open(work / "eval" / "shapes" / f"{name}.png")
        assert grid.size == (64 + 6, 2 * (64 + 6) + 2)  # 2 prompts x 1 image, 3 px frames, 2 px gap
    assert report["overall"] == pytest.approx(np.mean([c["score"] for c in report["categories"].values()]))
    assert report["model"] == str(model) and report["seconds"] > 0
    assert report["settings"]["num_sampling_steps"] == 4 and report["settings"]["hw"] == [64, 64]

    def prompts(r: dict) -> dict:
        return {k: [case["prompt"] for case in c["cases"]] for k, c in r["categories"].items()}

    run_cli(["eval", "shapes", "--model", model, "--per-category", "2", "-n", "1", "--out", "again"], capsys)
    run_cli(["eval", "shapes", "--model", model, "--per-category", "2", "-n", "1", "--out", "s1", "--seed", "1"],
            capsys)
    again, seed1 = (json.loads((work / d / "report.json").read_text()) for d in ("again", "s1"))
    assert prompts(again) == prompts(report)
    assert prompts(seed1) != prompts(report)


def test_eval_with_think_reports_thoughts(model: Path, work: Path, capsys: pytest.CaptureFixture) -> None:
    """`--think` on a model never trained to think: every image still gets judged, its (possibly empty,
    never a plan) thought is recorded, and the table adds the thought checks."""
    for benchmark, count in (("shapes", "--per-category"), ("edits", "--per-kind")):
        code, out, _ = run_cli(["eval", benchmark, "--model", model, count, "1", "-n", "1", "--think",
                                "--thought-max-tokens", "3", "--out", benchmark], capsys)
        assert code == 0 and "image~thought" in out and ("thought~caption" in out) == (benchmark == "shapes")
        report = json.loads((work / benchmark / "report.json").read_text())
        thinks = "think_edits" if benchmark == "edits" else "think"  # eval edits --think: the edits' setting
        assert report["settings"][thinks] is True and report["settings"]["thought_max_tokens"] == 3
        for c in report["categories"].values():
            assert [len(case["thoughts"]) for case in c["cases"]] == [1] and c["images"] == 1
            assert all(isinstance(t, str) for case in c["cases"] for t in case["thoughts"])
            assert c["image_agrees_with_thought"] == 0.0  # random text is no plan
        assert report["image_agrees_with_thought"] == 0.0


def test_eval_edits(model: Path, work: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, _ = run_cli(["eval", "edits", "--model", model, "--per-kind", "2", "-n", "1"], capsys)
    assert code == 0
    folder = work / "eval" / "edits"
    report = json.loads((folder / "report.json").read_text())
    assert list(report["categories"]) == list(EDIT_OPS) and report["benchmark"] == "edits"
    for kind, c in report["categories"].items():
        assert (c["prompts"], c["images"]) == (2, 2)
        assert all(parse_instruction(case["instruction"]).op == kind for case in c["cases"])
        assert Image.open(folder / f"{kind}.png").size == (2 * 70 + 2, 2 * 70 + 2)  # source + 1 edit per row
    run_cli(["eval", "edits", "--model", model, "--per-kind", "2", "-n", "1", "--out", "again"], capsys)
    again = json.loads((work / "again" / "report.json").read_text())
    assert [case["instruction"] for c in again["categories"].values() for case in c["cases"]] == \
        [case["instruction"] for c in report["categories"].values() for case in c["cases"]]


def test_benchmark_prompts_follow_the_spec() -> None:
    prompts = benchmark_prompts(30, seed=5)
    assert prompts == benchmark_prompts(30, seed=5) and prompts != benchmark_prompts(30, seed=6)
    assert benchmark_prompts(10, seed=5)["colors"] == prompts["colors"][:10]  # a bigger set extends a smaller
    forms = {"single_object": "single", "two_object": "and", "counting": "count", "colors": "single",
             "position": "relation", "color_attr": "and"}
    for category, texts in prompts.items():
        for text in texts:
            cap = parse_caption(text)
            assert cap.form == forms[category] and cap.background == "light"
            coloured = [p.colour is not None for p in cap.objects]
            assert all(coloured) if category in ("colors", "color_attr") else not any(coloured), text
            if cap.form in ("and", "relation"):
                assert cap.objects[0].shape != cap.objects[1].shape, text


class StubPipe:
    """A stand-in model: draws each caption perfectly, or returns each edit's source unchanged; with
    `settings.think` its thoughts are `thought(scene, k)` (image k's scene; edits: the source's)."""

    settings = GenerationSettings(hw=(64, 64))

    def thought(self, scene: Scene, k: int) -> str:
        return plan_text(scene)

    def iter_generate(self, prompts, settings, seeds, n, images, batch_images, progress):
        for i, p in enumerate(prompts):
            if images is not None:
                scenes = [None] * n
                ims = [images[i]] * n
            else:
                rng = np.random.default_rng(seeds[i])
                scenes = [scene_for_caption(rng, parse_caption(p), 64) for _ in range(n)]
                ims = [render_image(sc) for sc in scenes]
            if not settings.thinks(edit=images is not None):
                thoughts = [""] * n
            elif images is not None:  # the unchanged source's plan: what the stub's edits show
                thoughts = [plan_text(Scene.from_labels(self.sources[p]))] * n
            else:
                thoughts = [self.thought(sc, k) for k, sc in enumerate(scenes)]
            yield i, ims, thoughts


def test_prompt_instances_with_one_caption_get_their_own_images(pipe: NextStepPipeline) -> None:
    """The sets repeat captions; each instance has its own seed, so repeats are new samples."""
    report = run_shapes_benchmark(pipe, per_category=6, n=1)
    single = report["categories"]["single_object"]
    captions = [c["prompt"] for c in single["cases"]]
    assert len(set(captions)) < len(captions)  # some caption is repeated ...
    assert len({c["seed"] for c in single["cases"]}) == len(captions)  # ... with its own seed
    assert all(c["distinct_images"] == c["images"] for c in report["categories"].values())


def test_benchmark_scores_and_frames(tmp_path: Path) -> None:
    report = run_shapes_benchmark(StubPipe(), per_category=3, n=2, seed=0, batch_size=4, out=tmp_path / "s")
    assert report["overall"] == 1.0 and all(c["passed"] == 6 for c in report["categories"].values())
    grid = np.asarray(Image.open(tmp_path / "s" / "counting.png"))
    assert tuple(grid[0, 0]) == PASS and tuple(grid[-1, -1]) == PASS
    # An unchanged source is never a correct edit.
    report = run_edits_benchmark(StubPipe(), per_kind=2, n=1, seed=0, out=tmp_path / "e")
    assert report["overall"] == 0.0
    grid = np.asarray(Image.open(tmp_path / "e" / "add.png"))
    assert tuple(grid[0, -1]) == FAIL


class OffPalettePipe(StubPipe):
    """Draws every caption's objects right, but in a brown that is no palette colour."""

    def iter_generate(self, prompts, settings, seeds, n, images, batch_images, progress):
        for i, ims, thoughts in super().iter_generate(prompts, settings, seeds, n, images, batch_images, progress):
            arrays = [np.array(im) for im in ims]
            for a in arrays:
                a[np.abs(a.astype(int) - a[0, 0]).sum(-1) > 30] = (120, 90, 60)  # every non-background pixel
            yield i, [Image.fromarray(a) for a in arrays], thoughts


def test_benchmark_counts_off_palette_images() -> None:
    clean = run_shapes_benchmark(StubPipe(), per_category=2, n=1, seed=0)
    assert clean["off_palette_without_colour_words"] == 0.0
    assert all(c["off_palette"] == 0.0 for c in clean["categories"].values())
    brown = run_shapes_benchmark(OffPalettePipe(), per_category=2, n=1, seed=0)
    assert brown["off_palette_without_colour_words"] == 1.0 and brown["overall"] == 0.0
    assert all(c["off_palette"] == 1.0 for c in brown["categories"].values())


class MixedThoughtsPipe(StubPipe):
    """Image 0's thought is its plan; image 1's is the plan with the first object recoloured (a plan the
    image does not show, and which may not fit the caption); image 2 writes no plan at all."""

    def thought(self, scene: Scene, k: int) -> str:
        if k == 2:
            return "i will draw it"
        text = plan_text(scene)
        if k == 1:
            first = scene.objects[0].colour
            text = text.replace(first, "purple" if first != "purple" else "green", 1)
        return text


def test_benchmark_with_thinking_records_and_scores_thoughts(tmp_path: Path) -> None:
    think = GenerationSettings(hw=(64, 64), think=True)
    plain = run_shapes_benchmark(StubPipe(), per_category=2, n=1, seed=0)
    assert "thoughts" not in plain["categories"]["colors"]["cases"][0] and "image_agrees_with_thought" not in plain
    assert "thought~caption" not in format_table(plain)
    faithful = run_shapes_benchmark(StubPipe(), per_category=2, n=2, seed=0, settings=think)
    assert faithful["image_agrees_with_thought"] == 1.0
    for c in faithful["categories"].values():
        assert c["image_agrees_with_thought"] == 1.0
        for case in c["cases"]:
            assert [parse_plan(t) is not None for t in case["thoughts"]] == [True, True]
    # The true plan of a scene fits its caption, except where a relation's objects share a grid cell line.
    assert all(c["thought_agrees_with_caption"] == 1.0 for name, c in faithful["categories"].items()
               if name != "position")
    mixed = run_shapes_benchmark(MixedThoughtsPipe(), per_category=4, n=3, seed=0, settings=think)
    for c in mixed["categories"].values():
        assert c["image_agrees_with_thought"] == pytest.approx(1 / 3)  # image 0 of each prompt only
        for case in c["cases"]:
            assert case["image_agrees_with_thought"] == [True, False, False]
            assert case["thought_agrees_with_caption"][2] is False
    colours = mixed["categories"]["colors"]
    assert colours["thought_agrees_with_caption"] == pytest.approx(1 / 3)  # a colour caption: only image 0's fits
    single = mixed["categories"]["single_object"]  # no colour named: a recoloured plan still fits
    assert single["thought_agrees_with_caption"] == pytest.approx(2 / 3)
    assert mixed["thought_agrees_with_caption"] == pytest.approx(
        np.mean([c["thought_agrees_with_caption"] for c in mixed["categories"].values()]))
    assert mixed["overall"] == 1.0  # thoughts do not change how the images are judged
    table = format_table(mixed)
    assert "thought~caption" in table.splitlines()[0] and "image~thought" in table.splitlines()[0]
    overall = next(line for line in table.splitlines() if line.startswith("overall"))
    assert overall.split()[-2:] == [f"{mixed['thought_agrees_with_caption']:.3f}",
                                    f"{mixed['image_agrees_with_thought']:.3f}"]


def test_edits_benchmark_with_thinking_checks_images_against_thoughts() -> None:
    think = GenerationSettings(hw=(64, 64), think_edits=True)
    stub = StubPipe()
    cases = benchmark_edit_cases(2, 0, 64)
    stub.sources = {c.instruction: c.source.labels() for kind in cases.values() for c in kind}
    report = run_edits_benchmark(stub, per_kind=2, n=2, seed=0, settings=think)
    assert report["overall"] == 0.0 and report["image_agrees_with_thought"] == 1.0  # it drew what it thought
    assert "thought_agrees_with_caption" not in report
    assert all(case["thoughts"][0] == plan_text(Scene.from_labels(case["source"]))
               for c in report["categories"].values() for case in c["cases"])
    assert "image~thought" in format_table(report) and "thought~caption" not in format_table(report)


# ---------------------------------------------------------------------- bad input
def jsonl(work: Path, *lines: str) -> str:
    """Write p.jsonl (raw lines) and the out/ folder; return the file name."""
    (work / "p.jsonl").write_text("\n".join(lines) + "\n")
    (work / "out").mkdir(exist_ok=True)
    return "p.jsonl"


def gen_batch(*lines: str):
    return lambda w: ["generate", "--prompts", jsonl(w, *lines), "--out-dir", "out"]


EDIT_LINE = '{"id": "%s", "image": "%s", "instruction": "add a circle"}'

# case: (the arguments, given the working folder; what the one-line message must say)
BAD = {
    "empty prompt": (lambda w: ["generate", "  ", "-o", "x.png"], "the prompt is empty"),
    "missing folder": (lambda w: ["generate", "a circle", "-o", "nope/x.png"], "output folder nope does not exist"),
    "bad size": (lambda w: ["generate", "a circle", "--size", "72", "-o", "x.png"], "multiples of 16"),
    "zero images": (lambda w: ["generate", "a circle", "-n", "0"], "-n must be >= 1"),
    "both modes": (lambda w: ["generate", "a circle", "--prompts", "p.jsonl"], "not both"),
    "out-dir is a file": (lambda w: ["generate", "--prompts", "p.jsonl", "--out-dir", "good.png"],
                          "--out-dir good.png exists and is not a folder"),
    "bad seed": (gen_batch('{"id": "a", "caption": "x", "seed": -1}'), "p.jsonl line 1: seed must be an integer"),
    "bad json": (gen_batch('{"id": "a", "caption": "a circle"}', '{"id": "b",'), "p.jsonl line 2: not valid JSON"),
    "missing field": (gen_batch('{"id": "a"}'), "p.jsonl line 1: missing 'caption'"),
    "duplicate id": (gen_batch('{"id": "a", "caption": "x"}', "", '{"id": "a", "caption": "y"}'),
                     "p.jsonl line 3: id 'a' is already used on line 1"),
    "unsafe id": (gen_batch('{"id": "../a", "caption": "x"}'), "id '../a' must be"),
    "empty caption": (gen_batch('{"id": "a", "caption": " "}'), "line 1: 'caption' must be a non-empty string"),
    "missing image": (lambda w: ["edit", "--image", "gone.png", "add a circle"], "input image gone.png does not exist"),
    "unreadable image": (lambda w: ["edit", "--image", "bad.png", "add a circle"], "cannot read input image bad.png"),
    "no image": (lambda w: ["edit", "add a circle"], "give the source image with --image"),
    "empty instruction": (lambda w: ["edit", "--image", "good.png", ""], "the instruction is empty"),
    "unreadable image in batch": (
        lambda w: ["edit", "--prompts", jsonl(w, EDIT_LINE % ("a", "good.png"), EDIT_LINE % ("b", "bad.png")),
                   "--out-dir", "out"], "cannot read input image bad.png"),
    "eval count": (lambda w: ["eval", "shapes", "--per-category", "0"], "N must be >= 1"),
    "eval out is a file": (lambda w: ["eval", "edits", "--out", "good.png"],
                           "--out good.png exists and is not a folder"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case: str, model: Path, work: Path, capsys: pytest.CaptureFixture) -> None:
    source_image().save(work / "good.png")
    (work / "bad.png").write_text("not a png")
    make_args, message = BAD[case]
    args = make_args(work)
    before = files(work)
    code, _, err = run_cli(args + ["--model", model], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"nextstep {args[0]}: error: "), err
    assert message in err
    assert files(work) == before  # nothing written


def test_missing_shipped_model_on_the_command_line(monkeypatch: pytest.MonkeyPatch, work: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(pipeline_module, "SHIPPED_MODEL", work / "assets" / "shapes")
    code, _, err = run_cli(["generate", "a circle"], capsys)
    assert code == 2 and "the shipped model is not installed at" in err and files(work) == set()


def test_unknown_option(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["generate", "a circle", "--colour", "red"])
    assert e.value.code == 2 and "unrecognized arguments: --colour red" in capsys.readouterr().err


def test_exit_status_of_the_real_command(model: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "nextstep", "generate", "", "--model", str(model)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr == "nextstep generate: error: the prompt is empty\n"
    assert list(tmp_path.iterdir()) == []
