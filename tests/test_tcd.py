"""TCDScheduler (Hyper-SD's sampler): whole trajectories equal diffusers' for several `eta`, run
as the sampler runs them (tests/test_schedulers.py's loop, fresh noise fed to both sides)."""

import diffusers
import pytest

from nag_jax.schedulers import make_schedule
from test_schedulers import SDXL_EULER, assert_same_run

HYPER_SD_TCD = {**SDXL_EULER, "_class_name": "TCDScheduler"}  # Hyper-SD swaps the SDXL scheduler for TCD


def tcd_scheduler(config, eta):
    scheduler = diffusers.TCDScheduler.from_config(config)
    step = scheduler.step
    scheduler.step = lambda *args, **kwargs: step(*args, eta=eta, **kwargs)  # what the pipelines pass
    return scheduler


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("num_steps", [1, 4, 8])
@pytest.mark.parametrize("overrides", [{}, {"prediction_type": "v_prediction", "original_inference_steps": 100}],
                         ids=["sdxl", "v_prediction"])
def test_tcd_trajectory_matches_diffusers(eta, num_steps, overrides):
    config = {**HYPER_SD_TCD, **overrides}
    scheduler = tcd_scheduler(config, eta)
    schedule = make_schedule(config, num_steps, eta=eta)
    assert schedule.needs_noise == (eta > 0 and num_steps > 1)
    assert_same_run(schedule, scheduler, num_steps, num_inference_steps=num_steps)


def test_tcd_custom_timesteps():
    scheduler = tcd_scheduler(HYPER_SD_TCD, 0.5)
    assert_same_run(make_schedule(HYPER_SD_TCD, None, timesteps=[999, 759, 499, 259], eta=0.5), scheduler, 4,
                    timesteps=[999, 759, 499, 259])


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="tcd", eta=1.5), "eta = 1.5"),
    (dict(name="euler", eta=0.3), "eta is only supported for TCDScheduler"),
])
def test_tcd_eta_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(SDXL_EULER, 4, **kwargs)
