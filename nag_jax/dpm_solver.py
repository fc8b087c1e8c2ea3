"""DPM-Solver++ multistep (order <= 2) equal to diffusers' `DPMSolverMultistepScheduler`
(`algorithm_type="dpmsolver++"`): discrete-time (SD, PixArt; Karras sigmas too) and on flow
sigmas (`use_flow_sigmas`, SANA). Built by `nag_jax.schedulers.make_schedule`; per-step
coefficients computed in numpy, the step a traced table lookup like the other schedules.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from nag_jax.schedulers import (DiscreteSchedule, _alphas_cumprod, _at, _check, _discrete_fields, _f32, _float32,
                                _karras, _reject, _sigma_to_t, _x0_coefs)


@dataclasses.dataclass(frozen=True, eq=False)
class DPMSolverSchedule(DiscreteSchedule):
    """DPM-Solver++ multistep (order <= 2). State: the previous step's x0 prediction.

    prev = sample_coef * x + x0_coef * x0 + diff_coef * (x0 - previous x0), where diff_coef is 0
    on first-order steps (the first step and, per config, the last).
    """

    sample_coef: np.ndarray
    x0_coef: np.ndarray
    diff_coef: np.ndarray

    def init_state(self, sample):
        return jnp.zeros(sample.shape, jnp.float32)

    def step(self, state, step, model_output, sample, noise):
        x, m = _float32(sample, model_output)
        x0 = self.predict_x0(step, x, m)
        prev = (
            _at(self.sample_coef, step) * x
            + _at(self.x0_coef, step) * x0
            + _at(self.diff_coef, step) * (x0 - state)
        )
        return prev.astype(sample.dtype), x0


def _dpm_timesteps(cfg, cls_name, num_steps, alphas_cumprod) -> np.ndarray:
    """DPM-Solver's own spacing: like the others but on num_steps + 1 points, dropping the last,
    and ending where lambda(t) stays above `lambda_min_clipped`."""
    n_train = cfg["num_train_timesteps"]
    lambdas = np.log(alphas_cumprod**0.5) - np.log((1 - alphas_cumprod) ** 0.5)
    last = n_train - int(np.searchsorted(lambdas[::-1], cfg["lambda_min_clipped"]))
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ratio = last // (num_steps + 1)
        ts = (np.arange(num_steps + 1) * ratio).round()[::-1][:-1] + cfg["steps_offset"]
    elif spacing == "trailing":
        ts = np.arange(last, 0, -n_train / num_steps).round() - 1
    else:
        _reject(cls_name, "timestep_spacing", spacing, ["linspace", "leading", "trailing"])
    return ts.astype(np.int64)


def dpmpp_2m(cfg, cls_name, num_steps, timesteps):
    for key, allowed in [
        ("algorithm_type", ["dpmsolver++"]),
        ("solver_order", [1, 2]),
        ("solver_type", ["midpoint", "heun"]),
        ("final_sigmas_type", ["zero", "sigma_min"]),
        ("thresholding", [False]),
        ("rescale_betas_zero_snr", [False]),
        ("use_exponential_sigmas", [False, None]),
        ("use_beta_sigmas", [False, None]),
        ("use_lu_lambdas", [False, None]),
        ("use_dynamic_shifting", [False, None]),
        ("variance_type", [None]),
    ]:
        _check(cfg, cls_name, key, allowed)
    if cfg["use_flow_sigmas"]:
        return _dpmpp_2m_flow(cfg, cls_name, num_steps, timesteps)
    karras = bool(cfg["use_karras_sigmas"])
    if timesteps is not None and karras:
        raise ValueError(f"timesteps cannot be combined with use_karras_sigmas in {cls_name}; allowed: None")
    alphas_cumprod = _alphas_cumprod(cfg, cls_name)
    train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # float32
    if timesteps is not None:
        ts = np.asarray(timesteps).astype(np.int64)
    else:
        ts = _dpm_timesteps(cfg, cls_name, num_steps, alphas_cumprod)
    if karras:
        sigmas = _karras(float(train_sigmas[0]), float(train_sigmas[-1]), num_steps)
        ts = _sigma_to_t(sigmas, np.log(train_sigmas))
        if cfg["beta_schedule"] != "squaredcos_cap_v2":
            ts = ts.round()
        ts = ts.astype(np.int64)
    else:
        sigmas = np.interp(ts, np.arange(len(train_sigmas)), train_sigmas)
    last = train_sigmas[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32).astype(np.float64)
    alpha = 1 / (sigmas**2 + 1) ** 0.5
    return _dpm_solver_schedule(cfg, cls_name, ts, alpha, sigmas * alpha)


def _dpmpp_2m_flow(cfg, cls_name, num_steps, timesteps):
    """`use_flow_sigmas` (SANA): shifted flow sigmas on num_steps + 1 points, x = (1 - s) x0 + s noise,
    timesteps 1000 * sigma truncated to integers as diffusers stores them; "flow" nag_end rule."""
    if timesteps is not None:
        raise ValueError(f"timesteps cannot be combined with use_flow_sigmas in {cls_name}; allowed: None")
    if cfg["final_sigmas_type"] != "zero":
        _reject(cls_name, "final_sigmas_type", cfg["final_sigmas_type"], ["zero"])
    n_train, shift = cfg["num_train_timesteps"], cfg["flow_shift"]
    sigmas = 1.0 - np.linspace(1, 1 / n_train, num_steps + 1)
    sigmas = np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy()
    ts = (sigmas * n_train).astype(np.int64)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32).astype(np.float64)
    schedule = _dpm_solver_schedule(cfg, cls_name, ts, 1.0 - sigmas, sigmas)
    return dataclasses.replace(schedule, timestep_kind="flow")


def _dpm_solver_schedule(cfg, cls_name, ts, alpha, sigma_t):
    """DPM-Solver++ (order <= 2) coefficients for sample x = alpha * x0 + sigma_t * noise at each
    step's sigma and one past the last step."""
    n = len(ts)
    with np.errstate(divide="ignore"):  # the final sigma may be 0: lambda = inf, exp(-h) = 0
        lam = np.log(alpha) - np.log(sigma_t)
    h = lam[1:] - lam[:-1]
    phi = alpha[1:] * (np.exp(-h) - 1.0)  # the first-order update's x0 weight is -phi

    step = np.arange(n)
    last_first_order = (step == n - 1) & (
        cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15) or cfg["final_sigmas_type"] == "zero"
    )
    second_order = (cfg["solver_order"] == 2) & (step > 0) & ~last_first_order
    diff = np.zeros(n)
    i = np.nonzero(second_order)[0]
    r0 = (lam[i] - lam[i - 1]) / h[i]
    if cfg["solver_type"] == "midpoint":
        diff[i] = -0.5 * phi[i] / r0
    else:
        diff[i] = alpha[i + 1] * ((np.exp(-h[i]) - 1.0) / h[i] + 1.0) / r0
    if cfg["prediction_type"] == "flow_prediction":  # x0 = x - sigma * velocity
        x0_a, x0_b = np.ones(n), -sigma_t[:-1]
    else:
        x0_a, x0_b = _x0_coefs(cfg["prediction_type"], alpha[:-1], sigma_t[:-1], cls_name)
    return DPMSolverSchedule(
        **_discrete_fields(ts, x0_a, x0_b),
        sample_coef=_f32(sigma_t[1:] / sigma_t[:-1]),
        x0_coef=_f32(-phi),
        diff_coef=_f32(diff),
    )
