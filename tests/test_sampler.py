"""The sampler's static structure, read off compiled programs of the tiny SD1.5-like pipeline.

- `nag_end` split: the steps after the cut are a scan without the negative branch, so the
  program's FLOPs are exactly those of k NAG steps plus N - k plain steps.
- `lax.scan`: the traced program is the same size for 4 and 50 steps.
- per-step reporting: `callback_on_step` sees every step in order, and progress bars and new
  seeds reuse the one compiled program.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest

import nag_jax
from nag_jax.sampler import Segment, denoise_loop, segments
from tiny_pipelines import make_sd_pipeline, sampler_call

SIZE = dict(height=16, width=16)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return nag_jax.NAGPipeline.from_pretrained(make_sd_pipeline(tmp_path_factory.mktemp("sd15"), "sd15"))


@pytest.fixture(scope="module")
def sampler_args(pipe):
    """What the pipeline hands the sampler for a NAG + CFG call (captured; the loop is not run)."""
    return sampler_call(lambda: pipe("a cat", nag_scale=3.0, nag_end=0.5, num_inference_steps=4, output_type="latent",
                                     **SIZE))


def lowered(pipe, schedule, plan, args):
    loop = functools.partial(denoise_loop, pipe.family.denoise, schedule, plan, "none")
    return jax.jit(loop).lower(*args)


def flops(pipe, sampler_args, **plan_changes):
    plan = dataclasses.replace(sampler_args["plan"], **plan_changes)
    compiled = lowered(pipe, sampler_args["schedule"], plan, sampler_args["args"]).compile()
    analysis = compiled.cost_analysis()
    return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


def test_nag_end_split_drops_the_negative_branch_after_the_cut(pipe, sampler_args):
    plan, steps = sampler_args["plan"], sampler_args["schedule"].num_steps
    assert plan.cfg and plan.nag and 0 < plan.nag_steps < steps  # nag_end=0.5 cut 4 steps in two scans
    assert segments(plan, steps) == [Segment(0, plan.nag_steps, True), Segment(plan.nag_steps, steps, False)]
    all_nag = flops(pipe, sampler_args, nag_steps=steps)
    no_nag = flops(pipe, sampler_args, nag=False)
    split = flops(pipe, sampler_args)
    assert all_nag > no_nag * 1.01  # the negative branch costs something
    # XLA's cost analysis counts a while loop's body once: the split program is one NAG step
    # body plus one plain body, i.e. the second scan has no negative-branch attention at all.
    assert split == pytest.approx(all_nag + no_nag, rel=1e-3)


def test_program_size_does_not_grow_with_steps(pipe, sampler_args):
    def size(steps):
        schedule = pipe.family.make_schedule(steps, 16, 16, {})
        plan = dataclasses.replace(sampler_args["plan"], nag_steps=steps // 2)
        text = lowered(pipe, schedule, plan, sampler_args["args"]).as_text()
        return len(text.splitlines())

    assert size(4) == size(50)


def test_callback_on_step_sees_every_step_and_the_program_is_reused(pipe, capsys):
    seen = []
    record = lambda step, timestep, latents: seen.append((step, timestep, np.array(latents)))  # noqa: E731
    args = dict(prompt=["a cat", "a dog"], num_images_per_prompt=1, num_inference_steps=3, nag_scale=3.0,
                progress=True, callback_on_step=record, output_type="latent", **SIZE)
    compiled = len(pipe.sampler._compiled)
    first = pipe(seed=1, **args).images
    assert [step for step, _, _ in seen] == [0, 1, 2]
    timesteps = [t for _, t, _ in seen]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == 3
    assert all(latents.shape == (2, 4, 8, 8) for _, _, latents in seen)
    np.testing.assert_allclose(seen[-1][2], first, rtol=1e-6, atol=1e-6)
    assert "3/3" in capsys.readouterr().err  # the tqdm bar reached the last step

    second = pipe(seed=2, **args).images
    assert len(seen) == 6 and not np.allclose(first, second)
    assert len(pipe.sampler._compiled) == compiled + 1  # one program for both seeds ...
    program = pipe.sampler._compiled[list(pipe.sampler._compiled)[-1]]
    assert program._cache_size() == 1  # ... traced and compiled once
