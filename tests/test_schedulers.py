"""Schedulers: timesteps and whole trajectories equal diffusers', run the way the sampler runs
them (one jit, lax.scan over a traced int32 step index), with a fixed fake model output."""

import importlib
import math
from unittest import mock

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from nag_jax.schedulers import SCHEDULER_CLASSES, flux_mu, flux_sigmas, make_schedule

SDXL_EULER = {  # stabilityai/stable-diffusion-xl-base-1.0 scheduler_config.json
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
FLUX_SCHNELL = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}
FLUX_DEV = {**FLUX_SCHNELL, "shift": 3.0, "use_dynamic_shifting": True}
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}

# (scheduler name, config overrides, step counts)
CASES = [
    ("euler", {}, [1, 2, 4, 25]),
    ("euler", {"timestep_spacing": "trailing"}, [4]),
    ("euler", {"timestep_spacing": "linspace", "prediction_type": "v_prediction", "steps_offset": 0}, [25]),
    ("euler", {"use_karras_sigmas": True}, [1, 4, 25]),
    ("euler", {"prediction_type": "sample", "final_sigmas_type": "sigma_min"}, [4]),
    ("euler_ancestral", {}, [1, 25]),
    ("euler_ancestral", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, [4]),
    ("ddim", {}, [1, 25]),
    ("ddim", {"timestep_spacing": "trailing", "set_alpha_to_one": True}, [2]),
    ("ddim", {"timestep_spacing": "linspace", "prediction_type": "v_prediction"}, [4]),
    ("ddim", {"clip_sample": True, "prediction_type": "sample"}, [4]),
    ("dpmpp_2m", {}, [1, 2, 4, 25]),
    ("dpmpp_2m", {"use_karras_sigmas": True}, [1, 4, 25]),
    ("dpmpp_2m", {"timestep_spacing": "linspace", "prediction_type": "v_prediction"}, [25]),
    ("dpmpp_2m", {"timestep_spacing": "trailing"}, [4]),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min", "lower_order_final": False}, [25]),
    ("dpmpp_2m", {"solver_type": "heun", "use_karras_sigmas": True}, [25]),
    ("dpmpp_2m", {"solver_order": 1}, [4]),
    ("lcm", {}, [1, 4, 8]),
    ("lcm", {"prediction_type": "v_prediction", "original_inference_steps": 100}, [4]),
]


def fake_model_torch(x, t):
    t = float(t)
    return 0.3 * x * math.cos(t / 137.0) + 0.2 * torch.sin(x + t / 251.0)


def fake_model_jax(x, t):
    return 0.3 * x * jnp.cos(t / 137.0) + 0.2 * jnp.sin(x + t / 251.0)


def init_noise_sigma(scheduler):
    # flow matching schedulers have none; their pipelines use the noise as it is
    return float(getattr(scheduler, "init_noise_sigma", 1.0))


def run_diffusers(scheduler, latents, noises, **set_timesteps_kwargs):
    """The diffusers denoising loop, with the noise of every randn_tensor call fed from `noises`."""
    scheduler.set_timesteps(**set_timesteps_kwargs)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)  # what the SDXL / Flux / SD3 pipelines do
    module = importlib.import_module(type(scheduler).__module__)
    fed = iter(noises)
    x = torch.from_numpy(latents) * init_noise_sigma(scheduler)
    with mock.patch.object(module, "randn_tensor", lambda *a, **k: torch.from_numpy(next(fed)), create=True):
        for t in scheduler.timesteps:
            # flow matching schedulers have no input scaling
            model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            x = scheduler.step(fake_model_torch(model_input, t), t, x).prev_sample
    return scheduler.timesteps.numpy(), x.numpy()


def run_jax(schedule, latents, noises):
    """The sampler's shape of loop: one jit, lax.scan over traced int32 step indices."""

    @jax.jit
    def loop(latents, noises):
        timesteps = jnp.asarray(schedule.timesteps)

        def body(carry, xs):
            x, state = carry
            step, noise = xs
            model_input = schedule.scale_model_input(x, step)
            output = fake_model_jax(model_input, timesteps[step])
            x, state = schedule.step(state, step, output, x, noise if schedule.needs_noise else None)
            return (x, state), None

        x = latents * schedule.init_noise_sigma
        steps = jnp.arange(schedule.num_steps, dtype=jnp.int32)
        (x, _), _ = jax.lax.scan(body, (x, schedule.init_state(x)), (steps, noises))
        return x

    return np.asarray(loop(jnp.asarray(latents), jnp.asarray(np.stack(noises))))


def assert_same_run(schedule, scheduler, num_steps, **set_timesteps_kwargs):
    rng = np.random.default_rng(num_steps)
    latents = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    noises = [rng.standard_normal((1, 4, 8, 8), dtype=np.float32) for _ in range(num_steps)]
    ref_timesteps, ref = run_diffusers(scheduler, latents, noises, **set_timesteps_kwargs)
    assert schedule.timesteps.dtype == np.float32
    np.testing.assert_allclose(schedule.timesteps, ref_timesteps.astype(np.float64), rtol=0, atol=5e-4)
    assert schedule.init_noise_sigma == pytest.approx(init_noise_sigma(scheduler), rel=1e-6)
    ours = run_jax(schedule, latents, noises)
    scale = max(1.0, np.abs(ref).max())
    print(f"max |timestep diff| {np.abs(schedule.timesteps - ref_timesteps).max():.2e}, "
          f"max |sample diff| / scale {np.abs(ours - ref).max() / scale:.2e}")
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize(
    "name, overrides, num_steps",
    [
        pytest.param(name, overrides, n, id=f"{name}-{'-'.join(f'{k}={v}' for k, v in overrides.items())}-{n}")
        for name, overrides, steps in CASES
        for n in steps
    ],
)
def test_discrete_trajectory_matches_diffusers(name, overrides, num_steps):
    config = {**SDXL_EULER, **overrides}
    scheduler = getattr(diffusers, SCHEDULER_CLASSES[name]).from_config(config)
    schedule = make_schedule(config, num_steps, name=name)
    assert schedule.timestep_kind == "discrete"
    assert schedule.needs_noise == (name in ("euler_ancestral", "lcm"))
    assert_same_run(schedule, scheduler, num_steps, num_inference_steps=num_steps)


def test_class_name_picks_the_scheduler():
    config = {**SDXL_EULER, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    schedule = make_schedule(config, 4)
    assert_same_run(schedule, diffusers.DPMSolverMultistepScheduler.from_config(config), 4, num_inference_steps=4)


@pytest.mark.parametrize("name", ["lcm", "euler", "dpmpp_2m"])
def test_custom_timesteps_dmd2(name):
    """DMD2's 4-step schedule (LCMScheduler in its repository)."""
    timesteps = [999, 749, 499, 249]
    config = {**SDXL_EULER, "_class_name": SCHEDULER_CLASSES[name]}
    schedule = make_schedule(config, 4, timesteps=timesteps)
    np.testing.assert_array_equal(schedule.timesteps, timesteps)
    scheduler = getattr(diffusers, SCHEDULER_CLASSES[name]).from_config(config)
    assert_same_run(schedule, scheduler, 4, timesteps=timesteps)


@pytest.mark.parametrize(
    "config, num_steps, pipeline",
    [
        (FLUX_SCHNELL, 1, "flux"),
        (FLUX_SCHNELL, 4, "flux"),
        (FLUX_DEV, 2, "flux"),
        (FLUX_DEV, 28, "flux"),
        (SD3, 1, "sd3"),
        (SD3, 4, "sd3"),
        (SD3, 28, "sd3"),
        ({**SD3, "shift_terminal": 0.1}, 4, "sd3"),
        (SD3, 3, "custom timesteps"),
    ],
)
def test_flow_euler_matches_the_pipelines(config, num_steps, pipeline):
    """Flux passes sigmas = linspace(1, 1/n, n) and mu from the image length; SD3 passes neither."""
    mu = calculate_shift(4096, 256, 4096, 0.5, 1.15)
    kwargs = {
        "flux": {"sigmas": flux_sigmas(num_steps), "mu": mu},
        "sd3": {},
        "custom timesteps": {"timesteps": [1000.0, 600.0, 200.0]},
    }[pipeline]
    schedule = make_schedule(config, num_steps, **kwargs)
    assert schedule.timestep_kind == "flow" and not schedule.needs_noise
    np.testing.assert_array_equal(schedule.scale_model_input(jnp.full((2,), 3.0), 0), [3.0, 3.0])
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    assert_same_run(schedule, scheduler, num_steps, num_inference_steps=num_steps, **kwargs)


WAN_UNIPC = {  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler_config.json
    "_class_name": "UniPCMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
    "disable_corrector": [], "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0,
    "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2, "solver_p": None,
    "solver_type": "bh2", "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace",
    "trained_betas": None, "use_beta_sigmas": False, "use_exponential_sigmas": False, "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}


@pytest.mark.parametrize(
    "overrides, num_steps",
    [({}, 1), ({}, 2), ({}, 4), ({}, 50), ({"flow_shift": 5.0}, 25), ({"solver_order": 3}, 8),
     ({"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"}, 8),
     ({"lower_order_final": False, "final_sigmas_type": "sigma_min"}, 6), ({"disable_corrector": [0, 2]}, 5)],
)
def test_unipc_flow_matches_diffusers(overrides, num_steps):
    """Wan's scheduler: UniPC (predictor + corrector) on shifted flow sigmas, integer timesteps."""
    config = {**WAN_UNIPC, **overrides}
    schedule = make_schedule(config, num_steps)
    assert schedule.timestep_kind == "flow" and not schedule.needs_noise
    assert_same_run(schedule, diffusers.UniPCMultistepScheduler.from_config(config), num_steps,
                    num_inference_steps=num_steps)


def test_flow_euler_with_wan_shift():
    """Few-step Wan recipes swap in flow-match Euler with the Wan shift."""
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 5.0}
    assert_same_run(make_schedule(config, 4), diffusers.FlowMatchEulerDiscreteScheduler.from_config(config), 4,
                    num_inference_steps=4)


def test_flux_mu_equals_the_pipeline():
    for seq_len in (256, 1024, 4096, 6000):
        assert flux_mu(seq_len, 256, 4096, 0.5, 1.15) == pytest.approx(calculate_shift(seq_len, 256, 4096, 0.5, 1.15))


def test_schedule_runs_outside_jit_with_python_step():
    schedule = make_schedule(SDXL_EULER, 4, name="dpmpp_2m")
    x = jnp.ones((1, 4, 2, 2))
    state = schedule.init_state(x)
    for i in range(schedule.num_steps):
        x, state = schedule.step(state, i, 0.1 * x, x, None)
    assert np.isfinite(np.asarray(x)).all()


@pytest.mark.parametrize(
    "kwargs, config, match",
    [
        ({"name": "heun"}, SDXL_EULER, "name = 'heun'"),
        ({}, {**SDXL_EULER, "_class_name": "PNDMScheduler"}, "_class_name"),
        ({}, {"num_train_timesteps": 1000}, "_class_name"),
        ({"num_inference_steps": 0}, SDXL_EULER, "num_inference_steps"),
        ({"num_inference_steps": -3}, SDXL_EULER, "num_inference_steps"),
        ({"name": "dpmpp_2m"}, {**SDXL_EULER, "algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
        ({"name": "dpmpp_2m"}, {**SDXL_EULER, "solver_order": 3}, "solver_order"),
        ({"name": "ddim"}, {**SDXL_EULER, "thresholding": True}, "thresholding"),
        ({}, {**SDXL_EULER, "timestep_spacing": "uniform"}, "timestep_spacing"),
        ({}, {**SDXL_EULER, "beta_schedule": "sigmoid"}, "beta_schedule"),
        ({}, {**SDXL_EULER, "use_exponential_sigmas": True}, "use_exponential_sigmas"),
        ({"name": "euler_ancestral"}, {**SDXL_EULER, "prediction_type": "sample"}, "prediction_type"),
        ({"name": "lcm", "num_inference_steps": 60}, SDXL_EULER, "original_inference_steps"),
        ({"name": "lcm", "timesteps": [249, 499], "num_inference_steps": None}, SDXL_EULER, "descending"),
        ({"timesteps": [999, 499], "num_inference_steps": 3}, SDXL_EULER, "num_inference_steps"),
        ({"name": "ddim", "timesteps": [999, 499]}, SDXL_EULER, "timesteps"),
        ({}, FLUX_DEV, "mu"),
        ({"mu": 1.0}, SDXL_EULER, "mu"),
        ({"sigmas": [1.0, 0.5]}, SDXL_EULER, "sigmas"),
    ],
)
def test_make_schedule_errors(kwargs, config, match):
    kwargs = {"num_inference_steps": 4, **kwargs}
    steps = kwargs.pop("num_inference_steps")
    with pytest.raises(ValueError, match=match):
        make_schedule(config, steps, **kwargs)
