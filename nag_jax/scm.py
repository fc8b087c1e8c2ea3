"""SANA-Sprint's SCM sampling (diffusers' `SCMScheduler` with the pipeline's trigflow wrapping).

Trigflow times run from `max_timesteps` (pi/2: pure noise) to 0: linearly over the steps, or
[max, intermediate, 0] at two steps. Latents live at the scale sigma_data. At time t the model
sees x / sigma_data * c with s = sin t / (cos t + sin t), c = sqrt(s^2 + (1 - s)^2), and the
timestep s; its output o becomes the trigflow velocity
v = ((1 - 2s) x_in + (1 - 2s + 2s^2) o) / c * sigma_data, the clean estimate is
x0 = cos t * x - sin t * v, and the next sample cos t' * x0 + sin t' * sigma_data * noise (at the
last step t' = 0: x0 itself). Timesteps are stored as 1000 * s, so `nag_end` follows the flow rule.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from nag_jax.schedulers import Schedule, _at

SCM_DEFAULTS = {"num_train_timesteps": 1000, "prediction_type": "trigflow", "sigma_data": 0.5}


@dataclasses.dataclass(frozen=True, eq=False)
class SCMSchedule(Schedule):
    trig_times: np.ndarray  # [num_steps + 1] float32 trigflow times, ending at 0
    input_scale: np.ndarray  # [num_steps] c / sigma_data
    s: np.ndarray  # [num_steps] the model's timestep
    sigma_data: float

    def scale_model_input(self, sample, step):
        return sample * _at(self.input_scale, step).astype(sample.dtype)

    def step(self, state, step, model_output, sample, noise):
        x = sample.astype(jnp.float32)
        s, c = _at(self.s, step), _at(self.input_scale, step) * self.sigma_data
        model_input = x * _at(self.input_scale, step)
        velocity = ((1 - 2 * s) * model_input + (1 - 2 * s + 2 * s * s) * model_output.astype(jnp.float32)) / c
        velocity = velocity * self.sigma_data
        t, t_next = _at(self.trig_times, step), _at(self.trig_times, step + 1)
        x0 = jnp.cos(t) * x - jnp.sin(t) * velocity
        prev = jnp.cos(t_next) * x0
        if noise is not None:
            prev = prev + jnp.sin(t_next) * noise.astype(jnp.float32) * self.sigma_data
        return prev.astype(sample.dtype), state


def make_scm_schedule(scheduler_config: dict, num_inference_steps: int, max_timesteps: float = 1.57080,
                      intermediate_timesteps: float | None = 1.3) -> SCMSchedule:
    """The schedule SanaSprintPipeline follows; `intermediate_timesteps` is used at two steps only."""
    cfg = {**SCM_DEFAULTS, **{k: v for k, v in scheduler_config.items() if k in SCM_DEFAULTS}}
    if cfg["prediction_type"] != "trigflow":
        raise ValueError(f"SCMScheduler: prediction_type must be 'trigflow', got {cfg['prediction_type']!r}")
    if not isinstance(num_inference_steps, int) or num_inference_steps <= 0:
        raise ValueError(f"num_inference_steps = {num_inference_steps!r} must be a positive integer")
    if num_inference_steps == 2 and intermediate_timesteps is not None:
        trig = np.array([max_timesteps, intermediate_timesteps, 0.0], np.float32)
    else:
        trig = np.linspace(np.float32(max_timesteps), 0, num_inference_steps + 1, dtype=np.float32)
    t = trig[:-1]
    s = (np.sin(t) / (np.cos(t) + np.sin(t))).astype(np.float32)
    c = np.sqrt(s**2 + (1 - s) ** 2).astype(np.float32)
    sigma_data = float(cfg["sigma_data"])
    return SCMSchedule(timesteps=(s * 1000).astype(np.float32), timestep_kind="flow", init_noise_sigma=sigma_data,
                       needs_noise=num_inference_steps > 1, trig_times=trig, input_scale=c / np.float32(sigma_data),
                       s=s, sigma_data=sigma_data)
