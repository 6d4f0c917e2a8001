"""Fast sampling: the fused flow update, step schedules, and the token loop's thread choice."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nextstep import NextStepPipeline
from nextstep.cli.common import SETTING_FLAGS
from nextstep.sampling import FlowSampler
from nextstep.sampling.flow import SAMPLERS, STEP_SCHEDULE_PRESETS, STEP_SCHEDULES
from nextstep.sampling.threads import SINGLE_THREAD_MACS, intra_op_threads, token_loop_threads
from nextstep.settings import GenerationSettings, InvalidSettings

from .conftest import assert_close


@pytest.fixture(scope="module")
def pipe(ref10) -> NextStepPipeline:
    return NextStepPipeline.from_pretrained(ref10 / "model", ref10 / "vae", device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("kind", ["euler_maruyama", "sde", "cps", "ode"])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_fused_update_equals_the_general_path(pipe, kind, groups):
    """The fp32 path folds guidance, the final bias and the noise into one addmm per step; it
    computes what the step-by-step path (used under bf16 and autocast) computes."""
    g = torch.Generator().manual_seed(0)
    sampler = FlowSampler(kind, num_steps=6)
    c = torch.randn(groups * 2, 64, generator=g)
    noise = torch.randn(sampler.noise_draws, 2, 64, generator=g)
    fused = sampler.prepare(pipe.model.image_head.net, torch.device("cpu"))
    general = sampler.prepare(pipe.model.image_head.net, torch.device("cpu"))
    general.fused_update = False
    assert fused.fused_update
    with torch.no_grad():
        want = general.sample(c, noise, groups, 3.0, 2.0)
        assert_close(fused.sample(c, noise, groups, 3.0, 2.0), want, 1e-5, kind)
        # Extra noise draws (a step schedule passes the longest schedule's) are ignored.
        longer = torch.cat([noise, torch.randn(3, 2, 64, generator=g)])
        assert torch.equal(fused.sample(c, longer, groups, 3.0, 2.0), fused.sample(c, noise, groups, 3.0, 2.0))


def test_reused_modulation_views_follow_the_row_layout(pipe):
    """A prepared sampler keeps its modulation buffer and the per-step views cut from it across
    tokens. Two calls with the same number of rows but a different layout (2 guidance groups of 1
    image, then 1 group of 2 images) must each equal a freshly prepared sampler's result."""
    g = torch.Generator().manual_seed(1)
    sampler = FlowSampler("euler_maruyama", num_steps=5)
    net = pipe.model.image_head.net
    reused = sampler.prepare(net, torch.device("cpu"))
    with torch.no_grad():
        for groups, batch in [(2, 1), (1, 2), (2, 1)]:
            c = torch.randn(groups * batch, 64, generator=g)
            noise = torch.randn(sampler.noise_draws, batch, 64, generator=g)
            fresh = sampler.prepare(net, torch.device("cpu")).sample(c, noise, groups, 3.0)
            assert torch.equal(reused.sample(c, noise, groups, 3.0), fresh), (groups, batch)


def test_step_schedule_presets_save_head_evaluations():
    """Presets never rise over the tokens, respect their integrator's minimum and never exceed the
    official count; `fast` gives every token 6 of 20 steps of `cps` at noise 0.5 (3.3x fewer
    flow-head evaluations), whatever the sampler it replaces, within the noise the official count draws."""
    assert STEP_SCHEDULES[0] == "fixed" and set(STEP_SCHEDULES[1:]) == set(STEP_SCHEDULE_PRESETS)
    assert FlowSampler(num_steps=20).token_steps(64) == [20] * 64
    for name in STEP_SCHEDULE_PRESETS:
        for kind in SAMPLERS:
            for n_steps in (2, 20, 50):
                sampler = FlowSampler(kind, num_steps=n_steps, step_schedule=name)
                steps = sampler.token_steps(64)
                assert all(a >= b for a, b in zip(steps, steps[1:])), name
                assert min(steps) >= sampler.with_steps(1).min_steps and max(steps) <= n_steps
                # Every token's sampler finds the draws it reads.
                assert all(sampler.with_steps(n).noise_draws <= sampler.noise_draws for n in steps)
    for n in (16, 64):
        assert FlowSampler(num_steps=20, step_schedule="fast").token_steps(n) == [6] * n
    token = FlowSampler("euler_maruyama", num_steps=20, noise_level=0.8, step_schedule="fast").with_steps(6)
    assert (token.kind, token.noise_level, token.num_steps, token.step_schedule) == ("cps", 0.5, 6, "fixed")
    assert FlowSampler("euler_maruyama", num_steps=20, step_schedule="fast").noise_draws == 20  # as fixed
    assert FlowSampler("ode", num_steps=20, step_schedule="fast").noise_draws == 7  # cps: 1 + 6 steps
    assert FlowSampler("ode", num_steps=20).with_steps(6).kind == "ode"  # no schedule: the sampler's own
    with pytest.raises(ValueError, match="unknown step schedule 'slow'"):
        FlowSampler(step_schedule="slow")


def test_a_step_schedule_uses_the_first_draws_of_each_tokens_noise(pipe):
    """Under a preset every token is drawn with fewer steps from the first of the noise draws the
    official count makes (so the prompt's random numbers do not depend on the schedule): its
    request carries the same noise as the fixed one, and its tokens differ."""
    tokens, noise = {}, {}
    for schedule in ("fixed", "fast"):
        s = pipe.settings.with_overrides(step_schedule=schedule, num_sampling_steps=10, hw=(64, 64), cfg=3.0)
        request = pipe.prepare("a red fox", None, 1, 7, s)
        assert request.sampler.step_schedule == schedule
        noise[schedule] = request.noise
        tokens[schedule] = pipe.sample_tokens(request)
    assert torch.equal(noise["fixed"], noise["fast"])
    assert not torch.allclose(tokens["fixed"], tokens["fast"])


def test_step_schedule_is_a_setting_everywhere():
    assert GenerationSettings().step_schedule == "fixed"
    with pytest.raises(InvalidSettings) as e:
        GenerationSettings(step_schedule="fastest")
    assert e.value.names == ["step_schedule"]
    flags = {flag: field for flag, field, _, _ in SETTING_FLAGS}
    assert flags["--step-schedule"] == "step_schedule"
    from nextstep.serving.api import SETTING_EXTRAS, GenerationBody

    assert "step_schedule" in SETTING_EXTRAS and "step_schedule" in GenerationBody.model_fields


def test_thread_choice_follows_the_size_of_the_work():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert token_loop_threads(2, 256, 768, cpu) == 1  # batch 1 with CFG on the bench model
        assert token_loop_threads(8, 256, 768, cpu) is None  # batch 4: enough work for both threads
        assert token_loop_threads(2, 5120, 13824, cpu) is None  # a large model
        assert token_loop_threads(2, 256, 768, cuda) is None
        assert 2 * 256 * 768 < SINGLE_THREAD_MACS <= 8 * 256 * 768
        with intra_op_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), intra_op_threads(1):
            raise RuntimeError("restored even on error")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


def test_token_loop_restores_the_thread_setting(pipe):
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        s = pipe.settings.with_overrides(hw=(64, 64), num_sampling_steps=3)
        pipe.sample_tokens(pipe.prepare("a cat", None, 1, 1, s))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


def test_compile_option_defaults_by_device(pipe):
    from nextstep.sampling.compiled import compile_default

    assert compile_default(torch.device("cuda"), None) and not compile_default(torch.device("cpu"), None)
    assert compile_default(torch.device("cpu"), True) and not compile_default(torch.device("cuda"), False)
    assert pipe.compiled is None  # CPU pipelines run eagerly unless asked
    assert dataclasses.fields(FlowSampler)[-1].name == "step_schedule"
