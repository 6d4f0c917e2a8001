"""GRPO post-training: the transition log-probabilities are right, the teacher-forced recomputation
matches the rollout, a toy reward is learned (less so with a KL to the reference), a SIGKILLed run
resumes bit-exactly, 2 gloo ranks compute what 1 process does, and bad [grpo] settings fail early."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nextstep.errors import ConfigError
from nextstep.training.config import TrainConfig

RED_MARGIN = 20  # a pixel is red when R exceeds both G and B by this much


def red_reward(images, prompts, sources) -> list[float]:
    """The toy reward: the share of red pixels in each image (used by name, "tests.test_grpo:red_reward")."""
    out = []
    for im in images:
        a = np.asarray(im.convert("RGB")).astype(np.int16)
        out.append(float(((a[..., 0] > a[..., 1] + RED_MARGIN) & (a[..., 0] > a[..., 2] + RED_MARGIN)).mean()))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ref10) -> Path:
    """A fresh tiny model (2 layers of width 32, 32 px images of 4 tokens) saved as an init_from folder."""
    from nextstep.pipeline import NextStepPipeline
    from nextstep.training.config import ModelSection
    from nextstep.training.train import build_parts

    folder = tmp_path_factory.mktemp("grpo") / "model"
    config = TrainConfig(model=ModelSection(vae=str(ref10 / "vae"), config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        fm_head_dim=32, fm_head_layers=2, max_position_embeddings=256)))
    model, tokenizer, vae = build_parts(config, torch.device("cpu"))
    # init_weights zeroes the head's output layer (v = 0): give it small weights so images vary.
    torch.manual_seed(0)
    with torch.no_grad():
        model.image_head.net.final_layer.linear.weight.normal_(0, 0.3)
    NextStepPipeline(model.eval(), vae, tokenizer).save_pretrained(folder)
    return folder


def condition_the_head(model) -> None:
    """`init_weights` zeroes the flow head's adaLN modulations, so its velocity ignores the decoder's
    hidden state: small random ones make the log-probabilities depend on all the decoder reads."""
    g = torch.Generator().manual_seed(1)
    net = model.image_head.net
    with torch.no_grad():
        for block in [*net.res_blocks, net.final_layer]:
            block.adaLN_modulation[1].weight.normal_(0, 0.3, generator=g)


def write_config(folder: Path, model: Path, out: str, steps: int, lr: float = 3e-3, **grpo) -> Path:
    settings = {"group_size": 4, "prompts_per_step": 2, "reward": "tests.test_grpo:red_reward", **grpo}
    rollout = settings.pop("rollout_settings", "{ hw = [32, 32], num_sampling_steps = 4 }")
    lines = [f'out_dir = "{folder / out}"', 'stage = "grpo"', f"steps = {steps}", "seed = 0",
             f'init_from = "{model}"', "[grpo]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    lines += [f"rollout_settings = {rollout}", "[optim]", f"lr = {lr}", "warmup_steps = 0",
              "[train]", "checkpoint_every = 5", "keep_last = 3", "tensorboard = false",
              "sample_settings = { hw = [32, 32], num_sampling_steps = 2 }", 'sample_prompts = ["a red circle"]']
    path = folder / f"{out}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def stage_for(config_path: Path):
    """The GRPO stage of a config, built as `train()` builds it (one process)."""
    from nextstep import devices
    from nextstep.training import distributed as dist
    from nextstep.training.grpo_stage import GRPOStage
    from nextstep.training.stages import StageContext
    from nextstep.training.train import build_parts, train_only

    config = TrainConfig.from_file(config_path)
    config.check()
    device = torch.device("cpu")
    model, tokenizer, vae = build_parts(config, device)
    if config.train.trainable:
        train_only(model, config.train.trainable)
    env = dist.Env(0, 1, device)
    return GRPOStage(StageContext(config, env, model, model, tokenizer, vae, devices.autocast(device, None)))


# ---------------------------------------------------------------------- log-probabilities


def test_gaussian_log_prob_is_the_closed_form():
    from nextstep.training.grpo import gaussian_kl, gaussian_log_prob

    g = torch.Generator().manual_seed(0)
    x, mean = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    for sigma in (0.03, 0.5, 2.0):
        # log N(x; mu, s^2) of each dimension, written out with Python floats, then averaged.
        expected = torch.tensor([[(-(xi - mi) ** 2 / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi)))
                                  for xi, mi in zip(xr.tolist(), mr.tolist())] for xr, mr in zip(x, mean)]).mean(-1)
        torch.testing.assert_close(gaussian_log_prob(x, mean, sigma), expected, rtol=1e-6, atol=1e-5)
        # and the same as torch's own distribution
        torch.testing.assert_close(gaussian_log_prob(x, mean, sigma),
                                   torch.distributions.Normal(mean, sigma).log_prob(x).mean(-1))
        kl = torch.distributions.kl_divergence(torch.distributions.Normal(x, sigma),
                                               torch.distributions.Normal(mean, sigma)).mean(-1)
        torch.testing.assert_close(gaussian_kl(x, mean, sigma), kl)


@pytest.mark.parametrize("sampler", ["cps", "sde"])
def test_rollout_steps_are_the_recorded_gaussian_transitions(tiny, tmp_path, sampler):
    """Each recorded step is x' = a x + b v + sigma w with w the request's noise, so its log-probability
    is the closed form in w alone; deterministic steps (cps's last) carry none."""
    from nextstep.training.rollout import rollout

    stage = stage_for(write_config(tmp_path, tiny, "run", 1, sampler=sampler))
    prompts = stage.prompts(0)
    request = stage.request(0, prompts, stage.width(prompts))
    ro = rollout(stage.ctx.model, request)
    coefs = request.sampler.step_coefficients()
    assert ro.stochastic == [i for i, c in enumerate(coefs) if c[2] > 0]
    assert (sampler == "cps") == (len(ro.stochastic) == len(coefs) - 1)
    w = request.noise.permute(2, 0, 1, 3)  # (B, N, draws, D)
    for k, i in enumerate(ro.stochastic):
        sigma = coefs[i][2]
        expected = (-0.5 * w[:, :, i + 1].double() ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)).mean(-1)
        torch.testing.assert_close(ro.log_probs[:, :, k].double(), expected, rtol=0, atol=1e-5)
    assert torch.equal(ro.states[:, :, 0], w[:, :, 0].float())


@pytest.mark.parametrize("source_image", [None, "first", "last"])
def test_recomputed_log_probs_equal_the_rollouts(tiny, tmp_path, source_image):
    """Also for a step mixing text-to-image and edit prompts, the source image first or last in the row."""
    from dataclasses import replace

    from nextstep.training.rollout import rollout, transition_log_probs, transition_means

    if source_image is None:
        stage, step = stage_for(write_config(tmp_path, tiny, "run", 1)), 3
    else:
        rollout_settings = f'{{ hw = [32, 32], num_sampling_steps = 4, source_image = "{source_image}" }}'
        stage = stage_for(write_config(tmp_path, tiny, "run", 1, edit_fraction=0.5, prompts_per_step=4,
                                       rollout_settings=rollout_settings))
        step = next(s for s in range(50) if 0 < sum(stage.is_edit(s, j) for j in range(4)) < 4)
    condition_the_head(stage.ctx.model)
    prompts = stage.prompts(step)
    assert sum(p.source is not None for p in prompts) == (0 if source_image is None else
                                                          sum(stage.is_edit(step, j) for j in range(4)))
    ro = rollout(stage.ctx.model, stage.request(step, prompts, stage.width(prompts) + 2))  # padded beyond too
    model = stage.ctx.model
    means = transition_means(model, model.forward_hidden, ro, ro.stochastic)
    assert means.dtype == torch.float32 and means.requires_grad
    recomputed = transition_log_probs(means, ro, ro.stochastic)
    diff = (recomputed - ro.log_probs).abs().max().item()
    assert diff < 1e-5, f"teacher-forced log-probabilities differ from the rollout's by {diff:.3g}"
    # A subset of the steps gives the same numbers for those steps.
    some = ro.stochastic[1::2]
    sub = transition_log_probs(transition_means(model, model.forward_hidden, ro, some), ro, some)
    assert (sub - ro.log_probs[:, :, 1::2]).abs().max().item() < 1e-5
    if source_image is not None:
        # The source sits where the settings say, and the recomputation reads it: without it
        # (zeroed latents) the edit rows' transition means move, the text-to-image rows' do not.
        from nextstep.text.sequence import IMAGE_PLACEHOLDER

        edit_rows = (ro.input_ids == model.config.image_placeholder_id).any(1)
        texts = [p.text for p in prompts for _ in range(stage.grpo.group_size)]
        for row in edit_rows.nonzero()[:, 0].tolist():
            ids = ro.input_ids[row][ro.attention_mask[row].bool()].tolist()
            decoded = stage.ctx.tokenizer.decode(ids)
            assert decoded.count(texts[row]) == 1, decoded
            assert (decoded.find(IMAGE_PLACEHOLDER) < decoded.find(texts[row])) == (source_image == "first")
        blind = replace(ro, source_latents=torch.zeros_like(ro.source_latents))
        blind_means = transition_means(model, model.forward_hidden, blind, ro.stochastic)
        moved = (blind_means - means).abs().amax(dim=(1, 2, 3))  # measured: 1e-3 to 3e-3 on edit rows
        assert (moved[edit_rows] > 2e-4).all() and (moved[~edit_rows] < 1e-6).all(), moved


def test_group_advantages_and_rejection():
    from nextstep.training.grpo import clipped_objective, group_advantages

    rewards = torch.tensor([0.0, 1.0, 0.5, 0.5,  # a group with signal
                            0.3, 0.3, 0.3, 0.3,  # all equal: dropped
                            1.0, 1.0, 0.9, 1.0])  # mean 0.975: dropped by a threshold of 0.95
    adv, keep = group_advantages(rewards, 4, reject_mean_above=0.95)
    assert keep.tolist() == [True] * 4 + [False] * 8
    r = rewards[:4]
    torch.testing.assert_close(adv[:4], (r - r.mean()) / (r.std(unbiased=False) + 1e-4))
    assert adv[4:].abs().sum() == 0
    # The clipped surrogate: a ratio beyond 1 + eps earns no more for a positive advantage.
    logp_old = torch.zeros(3)
    obj, clipped = clipped_objective(torch.log(torch.tensor([1.0, 1.05, 0.9])), logp_old, torch.ones(3), 0.02)
    torch.testing.assert_close(obj, -torch.tensor([1.0, 1.02, 0.9]))
    assert clipped.tolist() == [False, True, True]


# ---------------------------------------------------------------------- learning


def test_a_toy_reward_is_learned_and_a_kl_weight_moves_less(tiny, tmp_path):
    """50 steps paying for red pixels raise their share; with a KL to the reference the weights move less."""
    from nextstep.training.train import train

    runs = {}
    for name, kl in (("free", 0.0), ("kl", 2.0)):
        config = TrainConfig.from_file(write_config(tmp_path, tiny, name, 50, lr=3e-2, group_size=8, kl_weight=kl))
        config.train.checkpoint_every = 50
        runs[name] = train(config)
    def gain(run: str) -> tuple[float, float]:  # the red share over the first and the last 10 steps
        m = metrics(tmp_path / run)
        return np.mean([x["reward_mean"] for x in m[:10]]), np.mean([x["reward_mean"] for x in m[-10:]])

    m = metrics(tmp_path / "free")
    before, after = gain("free")
    # Measured 0.182 -> 0.218 (free) and 0.169 -> 0.163 (KL-weighted) on an Intel CPU; 0.182 -> 0.200
    # (free) on an AMD one, whose kernels round differently: the margin sits below both gains and
    # above the KL-weighted run's change.
    assert after > before + 0.01, f"red share {before:.3f} (first 10 steps) -> {after:.3f} (last 10)"
    kl_before, kl_after = gain("kl")
    assert kl_after - kl_before < after - before
    assert "kl" in metrics(tmp_path / "kl")[0] and "kl" not in m[0]
    init = load_file(str(tiny / "model.safetensors"))

    def moved(export: Path) -> float:
        w = load_file(str(export / "model.safetensors"))
        return math.sqrt(sum((w[k] - init[k]).double().pow(2).sum().item() for k in init))

    assert moved(runs["kl"]) < moved(runs["free"]), (moved(runs["kl"]), moved(runs["free"]))


# ---------------------------------------------------------------------- resume and ranks

RESUME_COMPARED = ("step", "loss", "reward_mean", "reward_std", "clip_fraction", "rejected_groups", "grad_norm",
                   "reward_edits", "reward_t2i")


def test_sigkill_then_resume_is_bit_identical(tiny, tmp_path):
    """With text-to-image and edit prompts mixed."""
    from tests.test_train import kill_mid_run, run_train

    run_train(write_config(tmp_path, tiny, "whole", 10, edit_fraction=0.5))
    cut = write_config(tmp_path, tiny, "cut", 10, edit_fraction=0.5)
    lines = kill_mid_run(cut, tmp_path / "cut", 6)  # mid-run, past its first checkpoint (step 5)
    assert 6 <= lines < 10, f"the run was not interrupted mid-way ({lines} steps logged)"
    run_train(cut, "--resume")
    whole, resumed = metrics(tmp_path / "whole"), metrics(tmp_path / "cut")
    assert [[m.get(k) for k in RESUME_COMPARED] for m in resumed] == [[m.get(k) for k in RESUME_COMPARED]
                                                                       for m in whole]
    assert any("reward_edits" in m for m in whole) and any("reward_t2i" in m for m in whole)
    a, b = (load_file(str(tmp_path / run / "export" / "model.safetensors")) for run in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_ranks_equal_one_process(tiny, tmp_path):
    """Rollouts are dealt to the ranks by prompt; each image's noise depends on its prompt and the step only
    (text-to-image and edit prompts mixed)."""
    from tests.test_distributed import train as launch

    for name, ranks in (("one", 1), ("two", 2)):
        launch(write_config(tmp_path, tiny, name, 4, prompts_per_step=4, edit_fraction=0.5), ranks)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 3, 4]
    assert [sorted(m) for m in one] == [sorted(m) for m in two] and any("reward_edits" in m for m in one)
    for k in ("reward_mean", "reward_std", "rejected_groups", "groups", "loss", "grad_norm", "reward_edits"):
        diff = max((abs(x[k] - y[k]) for x, y in zip(one, two) if k in x), default=0.0)
        assert diff <= 1e-5, f"2 ranks vs 1 process: {k} differs by {diff:.3g}"
    assert one[0]["grad_norm"] > 0 and one[0]["groups"] == 4
    a, b = (load_file(str(tmp_path / run / "export" / "model.safetensors")) for run in ("one", "two"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


@pytest.mark.parametrize("setting, message", [
    ({"group_size": 1}, "grpo.group_size=1"),
    ({"clip_range": 0}, "grpo.clip_range=0"),
    ({"sampler": "euler_maruyama"}, "grpo.sampler='euler_maruyama'"),
    ({"step_fraction": 1.5}, "grpo.step_fraction=1.5"),
    ({"reject_mean_above": 2}, "grpo.reject_mean_above=2"),
    ({"prompts_per_step": 3}, "not divisible by 2 ranks"),
    ({"rollout_settings": "{ cfg = 3.0 }"}, "grpo.rollout_settings.cfg"),
    ({"rollout_settings": "{ cfg_img = 2.0 }"}, "grpo.rollout_settings.cfg_img"),
    ({"edit_fraction": 1.5}, r"grpo.edit_fraction=1.5 \(must be in \[0, 1\]"),
    ({"edit_fraction": 0.5, "prompts": "prompts.txt"}, "grpo.edit_fraction=0.5 with grpo.prompts"),
    ({"policy": "text"}, "grpo.policy='text' \\(one of \\('image', 'thought'\\)"),
    ({"policy": "thought", "thought_temperature": 0}, "grpo.thought_temperature=0.0 \\(must be > 0"),
    ({"policy": "thought", "edit_fraction": 0.5}, "grpo.edit_fraction=0.5 with grpo.policy='thought'"),
    ({"policy": "thought", "rollout_settings": "{ text_temperature = 0.5 }"}, "grpo.rollout_settings.text_temperature"),
    ({"policy": "thought"}, "grpo.policy='thought' needs train.trainable"),
    ({"policy": "thought"}, "grpo.policy='thought' runs in one process \\(2 ranks requested\\)"),
])
def test_bad_grpo_settings_fail_before_any_compute(tiny, tmp_path, setting, message):
    path = write_config(tmp_path, tiny, "bad", 1, **setting)
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_file(path).check(world_size=2)


def test_grpo_section_outside_a_grpo_stage_is_refused(tiny, tmp_path):
    path = write_config(tmp_path, tiny, "bad", 1)
    path.write_text(path.read_text().replace('stage = "grpo"', 'stage = "sft"'))
    with pytest.raises(ConfigError, match=r"\[grpo\] is set but stage='sft'"):
        TrainConfig.from_file(path).check()


def test_the_shapes_reward_gives_partial_credit():
    """The fraction of the caption's checks that hold: background, known objects, count, one per phrase."""
    from nextstep.shapes import parse_caption, render_image, scene_for_caption
    from nextstep.training.rewards import caption_score, load_reward

    scene = scene_for_caption(np.random.default_rng(0), parse_caption("a red circle and a blue square"), 64)
    image = render_image(scene)
    assert caption_score(image, "a red circle and a blue square") == 1.0
    # Colours swapped: background, known objects and count hold, neither phrase finds its object.
    assert caption_score(image, "a blue circle and a red square") == 3 / 5
    # One of two phrases found.
    assert caption_score(image, "a red circle and a green square") == 4 / 5
    assert load_reward("shapes")([image, image], ["a red circle and a blue square", "a red circle"],
                                 [None, None]) == [1.0, 3 / 4]  # only the count is wrong
    with pytest.raises(ValueError, match="module:function"):
        load_reward("nonsense")


# ---------------------------------------------------------------------- edits


def test_edit_prompts_are_a_deterministic_share_of_the_shapes_world(tiny, tmp_path):
    """Prompt j of step s is an edit when a draw of (seed, step, j) says so: then it is edit sample
    s * P + j of the world (its instruction and rendered source, at the rollouts' size), else caption
    sample s * P + j."""
    from nextstep.shapes import ShapesConfig, make_sample, parse_instruction, render_image

    path = write_config(tmp_path, tiny, "run", 1, edit_fraction=0.3, prompts_per_step=4)
    path.write_text(path.read_text() + '[data]\nsource_image = "last"\n')
    stage = stage_for(path)
    # The init_from folder (a training export) has no generation defaults: the source goes where training put it.
    assert (stage.settings.source_image, stage.settings.cfg, stage.settings.cfg_img) == ("last", 1, 1)
    draws = [[stage.is_edit(s, j) for j in range(4)] for s in range(100)]
    assert 0.22 < np.mean(draws) < 0.38, np.mean(draws)
    assert [[stage.is_edit(s, j) for j in range(4)] for s in reversed(range(100))] == draws[::-1]
    mixed = [s for s in range(100) if 0 < sum(draws[s]) < 4][:3]
    edit_world, world = ShapesConfig(size=32, seed=0, edits=True), ShapesConfig(seed=0)
    for step in mixed:
        for p in stage.prompts(step):
            if draws[step][p.j]:
                s = make_sample(edit_world, step * 4 + p.j)
                assert (p.text, p.category, p.edit_kind) == (s.instruction, "", parse_instruction(s.instruction).op)
                assert np.array_equal(np.asarray(p.source), np.asarray(render_image(s.source)))
            else:
                s = make_sample(world, step * 4 + p.j)
                assert (p.text, p.category, p.source, p.edit_kind) == (s.caption, s.category, None, "")
    for fraction, expected in ((0.0, False), (1.0, True)):
        stage.grpo.edit_fraction = fraction
        assert {stage.is_edit(s, j) for s in range(100) for j in range(4)} == {expected}


def test_an_edit_step_is_scored_by_the_edit_checker_and_logged(tiny, tmp_path):
    from nextstep.shapes import EDIT_OPS, check_edit, make_sample, render_image

    stage = stage_for(write_config(tmp_path, tiny, "run", 1, edit_fraction=1.0, reward="shapes", group_size=2,
                                   prompts_per_step=4))
    calls = []

    def recording(images, prompts, sources):
        calls.append((images, prompts, sources))
        return shapes(images, prompts, sources)

    shapes, stage.reward = stage.reward, recording
    out = stage.metrics(stage.accumulate_gradients(0))
    (images, prompts, sources), = calls
    step = stage.prompts(0)
    assert prompts == [p.text for p in step for _ in range(2)] and len(images) == 8
    assert all(src is not None and src.size == im.size == (32, 32) for im, src in zip(images, sources))
    passed = [check_edit(src, im, p).passed for im, p, src in zip(images, prompts, sources)]
    assert out["reward_edits"] == out["reward_mean"] == np.mean(passed) and "reward_t2i" not in out
    kinds = [p.edit_kind for p in step for _ in range(2)]
    assert {k for k in out if k.startswith("pass_")} == {f"pass_edit_{op}" for op in set(kinds)}
    for op in set(kinds):
        assert out[f"pass_edit_{op}"] == np.mean([ok for ok, k in zip(passed, kinds) if k == op])
    assert set(kinds) <= set(EDIT_OPS)
    # The built-in reward is the edit checker's verdict: the world's own target passes, the unchanged source not.
    s = make_sample(stage.edit_world, 0)
    source = render_image(s.source)
    assert shapes([render_image(s.scene), source], [s.instruction] * 2, [source, source]) == [1.0, 0.0]


# ---------------------------------------------------------------------- thoughts as the policy


def thought_config(folder: Path, model: Path, out: str, steps: int, **grpo) -> Path:
    """A `policy = "thought"` stage that trains the text head alone (images drawn as at inference)."""
    path = write_config(folder, model, out, steps, policy="thought", **grpo)
    path.write_text(path.read_text().replace("[train]\n", '[train]\ntrainable = ["lm_head"]\n'))
    return path


def test_token_log_probs_and_kl_are_the_closed_forms():
    from nextstep.training.grpo import THOUGHT_END, categorical_kl, token_log_probs

    g = torch.Generator().manual_seed(0)
    logits, other = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    T, stops = 0.7, [0, 9]
    got = token_log_probs(logits, torch.tensor([2, THOUGHT_END, 7]), T, stops)
    rows = [[math.exp(v / T) for v in row] for row in logits.tolist()]
    expected = [math.log(rows[0][2] / sum(rows[0])), math.log((rows[1][0] + rows[1][9]) / sum(rows[1])),
                math.log(rows[2][7] / sum(rows[2]))]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    p, q = torch.distributions.Categorical(logits=logits / T), torch.distributions.Categorical(logits=other / T)
    torch.testing.assert_close(categorical_kl(logits, other, T), torch.distributions.kl_divergence(p, q))


def test_thought_log_probs_equal_the_sampling_path(tiny, tmp_path):
    """The teacher-forced pass gives each written token (and each early end) the log-probability the
    KV-cache sampling loop gave it, within 1e-5 in float32."""
    from nextstep.training.grpo import token_log_probs

    stage = stage_for(thought_config(tmp_path, tiny, "lp", 1, thought_temperature=0.8))
    s, pipe = stage.settings, stage.pipe
    rows = [pipe.thought_prompt("a red circle above a blue square", None, s)] * 6
    trace: dict = {}
    written = pipe.write(rows, [None] * 6, list(range(6)), s, pipe.special_ids, 64, trace=trace)
    assert any(0 < len(w) < s.thought_max_tokens for w in written), [len(w) for w in written]  # some end early
    vocab = len(stage.ctx.tokenizer)
    expected = []
    for r, w in enumerate(written):
        for t, token in enumerate(w + ([-1] if len(w) < s.thought_max_tokens else [])):
            expected.append(token_log_probs(trace["logits"][t][r:r + 1, :vocab], torch.tensor([token]), 0.8,
                                            pipe.special_ids)[0])
    with torch.no_grad():
        logp, _, row_of = stage.thought_log_probs(rows, written)
    assert row_of.tolist() == [r for r, w in enumerate(written) for _ in range(len(w) + (len(w) < s.thought_max_tokens))]
    torch.testing.assert_close(logp, torch.stack(expected), rtol=0, atol=1e-5)


def test_a_thought_step_raises_the_better_thoughts_and_moves_only_the_text_head(tiny, tmp_path):
    """One step's gradient, taken, makes the thoughts with positive advantages likelier than those with
    negative ones; nothing but the text head gets a gradient; a 2-step run changes only `lm_head`."""
    from nextstep.training.grpo import group_advantages
    from nextstep.training.train import train

    stage = stage_for(thought_config(tmp_path, tiny, "step", 1, group_size=4, prompts_per_step=2))
    seen = {}
    write, reward = stage.pipe.write, stage.reward

    def first_write(rows, *args, **kwargs):
        out = write(rows, *args, **kwargs)
        seen.setdefault("rows", rows)
        seen.setdefault("written", out)
        return out

    stage.pipe.write = first_write
    stage.reward = lambda images, prompts, sources: seen.setdefault("scores", reward(images, prompts, sources))
    model = stage.ctx.model
    sums = stage.accumulate_gradients(0)
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["lm_head.weight"]
    advantages, keep = group_advantages(torch.tensor(seen["scores"]), 4, 1.0)
    assert keep.any(), seen["scores"]
    record = stage.metrics(sums)
    assert record["thought_tokens"] == sum(map(len, seen["written"])) / 8 and "reward_mean" in record

    def per_row() -> torch.Tensor:
        with torch.no_grad():
            logp, _, rows = stage.thought_log_probs(seen["rows"], seen["written"])
        return torch.zeros(8).index_add_(0, rows, logp)

    before = per_row()
    with torch.no_grad():
        model.lm_head.weight -= 0.05 * model.lm_head.weight.grad
    assert float((advantages * (per_row() - before)).sum()) > 0

    init = load_file(str(tiny / "model.safetensors"))
    config = TrainConfig.from_file(thought_config(tmp_path, tiny, "run", 2, group_size=4, prompts_per_step=2))
    after = load_file(str(train(config) / "model.safetensors"))
    assert sorted(k for k in init if not torch.equal(init[k], after[k])) == ["lm_head.weight"]
    assert all("thought_tokens" in m and "reward_mean" in m for m in metrics(tmp_path / "run"))


def test_benchmark_colours_reach_the_step_prompts(tiny, tmp_path):
    """A shapes source with `benchmark_colours` gives captions named as the benchmark's categories name colours."""
    from nextstep.shapes.dataset import ShapesConfig, make_sample

    path = write_config(tmp_path, tiny, "bc", 1, prompts_per_step=6)
    path.write_text(path.read_text() + '[data]\nsources = [{ kind = "shapes", benchmark_colours = true }]\n')
    got = [p.text for p in stage_for(path).prompts(1)]
    world = ShapesConfig(seed=0, dark_prob=0.2, colour_prob=None)
    assert got == [make_sample(world, 6 + j).caption for j in range(6)]
    assert got != [make_sample(ShapesConfig(seed=0, dark_prob=0.2), 6 + j).caption for j in range(6)]
