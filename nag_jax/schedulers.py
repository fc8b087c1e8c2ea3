"""Diffusion schedulers as pure, jit-able functions equal to their diffusers counterparts.

`make_schedule(scheduler_config, num_inference_steps)` reads the dict of a diffusers
`scheduler/scheduler_config.json` and returns a frozen `Schedule`. Everything that depends only on
the step count (timesteps, sigmas, per-step coefficients) is computed here in numpy, before any
tracing, following diffusers' dtype flow (float32 training tables, float64 arithmetic, float32
results). Inside the sampler's `lax.scan` the step index is a traced int32 and `step` only indexes
those tables, so one compiled loop serves every step.

Every scheduler here writes its prediction of the clean sample as x0 = a * sample + b * output,
with (a, b) per step depending on `prediction_type`; that keeps epsilon / v_prediction / sample
in one place per scheduler instead of as traced branches.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

SCHEDULER_CLASSES = {
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}

# The diffusers defaults of the options each scheduler reads; keys a config has beyond these are
# ignored, as diffusers' `from_config` ignores keys of other schedulers.
_DISCRETE_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "thresholding": False,
}
_DEFAULTS = {
    "EulerDiscreteScheduler": {
        **_DISCRETE_DEFAULTS,
        "timestep_spacing": "linspace",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    },
    "EulerAncestralDiscreteScheduler": {**_DISCRETE_DEFAULTS, "timestep_spacing": "linspace"},
    "DDIMScheduler": {
        **_DISCRETE_DEFAULTS,
        "timestep_spacing": "leading",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
    },
    "DPMSolverMultistepScheduler": {
        **_DISCRETE_DEFAULTS,
        "timestep_spacing": "linspace",
        "solver_order": 2,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "variance_type": None,
        "use_dynamic_shifting": False,
    },
    "LCMScheduler": {
        **_DISCRETE_DEFAULTS,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "timestep_scaling": 10.0,
    },
    "TCDScheduler": {
        **_DISCRETE_DEFAULTS,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "original_inference_steps": 50,
        "set_alpha_to_one": True,
    },
    "FlowMatchEulerDiscreteScheduler": {
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "invert_sigmas": False,
        "shift_terminal": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "time_shift_type": "exponential",
        "stochastic_sampling": False,
    },
}


# ----------------------------------------------------------------------------- the schedules


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """What the sampler needs from a scheduler. `eq=False` keeps it hashable (by identity)."""

    timesteps: np.ndarray  # [num_steps] float32, the value the denoiser sees at each step
    timestep_kind: str  # "discrete" (0..999 training scale) or "flow" (1000 * sigma)
    init_noise_sigma: float  # initial latents are multiplied by this
    needs_noise: bool  # True when `step` consumes fresh noise

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def init_state(self, sample):
        return ()

    def scale_model_input(self, sample, step):
        return sample

    def step(self, state, step, model_output, sample, noise):
        raise NotImplementedError


def _at(table: np.ndarray, step):
    """One float32 coefficient of a per-step table, at a (possibly traced) step index."""
    return jnp.asarray(table, jnp.float32)[step]


def _float32(*arrays):
    return [jnp.asarray(a).astype(jnp.float32) for a in arrays]


@dataclasses.dataclass(frozen=True, eq=False)
class DiscreteSchedule(Schedule):
    """A schedule on the 0..999 training timesteps, with its per-step x0 = a * sample + b * output."""

    x0_from_sample: np.ndarray
    x0_from_output: np.ndarray

    def predict_x0(self, step, x, m):
        return _at(self.x0_from_sample, step) * x + _at(self.x0_from_output, step) * m


def _discrete_fields(timesteps, x0_from_sample, x0_from_output, needs_noise=False, init_noise_sigma=1.0) -> dict:
    return dict(
        timesteps=np.asarray(timesteps).astype(np.float32),
        timestep_kind="discrete",
        init_noise_sigma=init_noise_sigma,
        needs_noise=needs_noise,
        x0_from_sample=_f32(x0_from_sample),
        x0_from_output=_f32(x0_from_output),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class EulerSchedule(DiscreteSchedule):
    """Euler (k-diffusion form, sigma = sqrt((1 - alpha_bar) / alpha_bar)), plain or ancestral."""

    input_scale: np.ndarray  # 1 / sqrt(sigma^2 + 1)
    sigmas: np.ndarray  # [num_steps] sigma at each step
    sigma_down: np.ndarray  # where the deterministic part of the step lands
    sigma_up: np.ndarray  # std of the fresh noise added (0 for plain Euler)

    def scale_model_input(self, sample, step):
        return (sample.astype(jnp.float32) * _at(self.input_scale, step)).astype(sample.dtype)

    def step(self, state, step, model_output, sample, noise):
        x, m = _float32(sample, model_output)
        sigma = _at(self.sigmas, step)
        x0 = self.predict_x0(step, x, m)
        derivative = (x - x0) / sigma
        prev = x + derivative * (_at(self.sigma_down, step) - sigma)
        if self.needs_noise:
            prev = prev + noise.astype(jnp.float32) * _at(self.sigma_up, step)
        return prev.astype(sample.dtype), state


@dataclasses.dataclass(frozen=True, eq=False)
class DDIMSchedule(DiscreteSchedule):
    """Deterministic DDIM (eta = 0)."""

    eps_from_sample: np.ndarray
    eps_from_output: np.ndarray
    sqrt_alpha_prev: np.ndarray
    sqrt_one_minus_alpha_prev: np.ndarray
    clip_range: float | None  # clamp of x0 when the config has clip_sample

    def step(self, state, step, model_output, sample, noise):
        x, m = _float32(sample, model_output)
        x0 = self.predict_x0(step, x, m)
        eps = _at(self.eps_from_sample, step) * x + _at(self.eps_from_output, step) * m
        if self.clip_range is not None:
            x0 = jnp.clip(x0, -self.clip_range, self.clip_range)
        prev = _at(self.sqrt_alpha_prev, step) * x0 + _at(self.sqrt_one_minus_alpha_prev, step) * eps
        return prev.astype(sample.dtype), state


@dataclasses.dataclass(frozen=True, eq=False)
class LCMSchedule(DiscreteSchedule):
    """Latent consistency: denoise with the boundary-condition scalings, then re-noise to the
    next timestep with fresh noise (noise weight 0 on the last step)."""

    c_skip: np.ndarray
    c_out: np.ndarray
    denoised_coef: np.ndarray
    noise_coef: np.ndarray
    clip_range: float | None

    def step(self, state, step, model_output, sample, noise):
        x, m = _float32(sample, model_output)
        x0 = self.predict_x0(step, x, m)
        if self.clip_range is not None:
            x0 = jnp.clip(x0, -self.clip_range, self.clip_range)
        denoised = _at(self.c_out, step) * x0 + _at(self.c_skip, step) * x
        prev = _at(self.denoised_coef, step) * denoised + _at(self.noise_coef, step) * noise.astype(jnp.float32)
        return prev.astype(sample.dtype), state


@dataclasses.dataclass(frozen=True, eq=False)
class TCDSchedule(DiscreteSchedule):
    """Trajectory consistency distillation (Hyper-SD's sampler): jump to the earlier timestep
    s = floor((1 - eta) * next timestep) along the predicted trajectory, then re-noise from s to the
    next timestep with fresh noise (not on the last step). Every term is linear in the sample and
    the model output, so a step is prev = sample_coef * x + output_coef * m + noise_coef * noise."""

    sample_coef: np.ndarray
    output_coef: np.ndarray
    noise_coef: np.ndarray

    def step(self, state, step, model_output, sample, noise):
        x, m = _float32(sample, model_output)
        prev = _at(self.sample_coef, step) * x + _at(self.output_coef, step) * m
        if self.needs_noise:
            prev = prev + _at(self.noise_coef, step) * noise.astype(jnp.float32)
        return prev.astype(sample.dtype), state


@dataclasses.dataclass(frozen=True, eq=False)
class FlowEulerSchedule(Schedule):
    """Flow matching Euler: x <- x + (sigma_next - sigma) * velocity."""

    sigmas: np.ndarray  # [num_steps + 1], last one 0
    dt: np.ndarray  # sigma_next - sigma, in float32 as diffusers takes it

    def step(self, state, step, model_output, sample, noise):
        x, v = _float32(sample, model_output)
        return (x + _at(self.dt, step) * v).astype(sample.dtype), state


# ----------------------------------------------------------------------------- numpy helpers


def _reject(cls_name, key, value, allowed):
    raise ValueError(f"scheduler_config[{key!r}] = {value!r} is not supported for {cls_name}; allowed: {allowed}")


def _check(cfg, cls_name, key, allowed):
    if cfg[key] not in allowed:
        _reject(cls_name, key, cfg[key], allowed)


def _alphas_cumprod(cfg, cls_name) -> np.ndarray:
    """float32 alpha_bar table. (diffusers builds betas in float32 and accumulates the product
    in double on CPU; float64 here then float32 agrees to about 3e-7 relative.)"""
    n = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], np.float32)
    elif cfg["beta_schedule"] == "linear":
        betas = np.linspace(cfg["beta_start"], cfg["beta_end"], n).astype(np.float32)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n).astype(np.float32) ** 2
    elif cfg["beta_schedule"] == "squaredcos_cap_v2":

        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], np.float32)
    else:
        _reject(cls_name, "beta_schedule", cfg["beta_schedule"], ["linear", "scaled_linear", "squaredcos_cap_v2"])
    return np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32)


def _spaced_timesteps(cfg, cls_name, num_steps) -> np.ndarray:
    """Descending float64 timesteps by `timestep_spacing` (Table 2 of arXiv:2305.08891)."""
    n_train = cfg["num_train_timesteps"]
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, num_steps)[::-1].copy()
    if spacing == "leading":
        ratio = n_train // num_steps
        return (np.arange(num_steps) * ratio).round()[::-1] + cfg["steps_offset"]
    if spacing == "trailing":
        return np.arange(n_train, 0, -n_train / num_steps).round() - 1
    _reject(cls_name, "timestep_spacing", spacing, ["linspace", "leading", "trailing"])


def _karras(sigma_min, sigma_max, num_steps, rho=7.0) -> np.ndarray:
    ramp = np.linspace(0, 1, num_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _sigma_to_t(sigmas, log_sigmas) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating linearly in log sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _x0_coefs(prediction_type, alpha, sigma, cls_name, allowed=("epsilon", "v_prediction", "sample")):
    """(a, b) with x0 = a * sample + b * output, for a sample x = alpha * x0 + sigma * eps."""
    if prediction_type not in allowed:
        _reject(cls_name, "prediction_type", prediction_type, list(allowed))
    if prediction_type == "epsilon":
        return 1 / alpha, -sigma / alpha
    if prediction_type == "v_prediction":
        return alpha, -sigma
    return np.zeros_like(alpha), np.ones_like(alpha)


def _eps_coefs(prediction_type, alpha_bar):
    """(c, d) with predicted noise = c * sample + d * output (prediction_type checked by _x0_coefs)."""
    return {
        "epsilon": (np.zeros_like(alpha_bar), np.ones_like(alpha_bar)),
        "sample": (1 / (1 - alpha_bar) ** 0.5, -(alpha_bar**0.5) / (1 - alpha_bar) ** 0.5),
        "v_prediction": ((1 - alpha_bar) ** 0.5, alpha_bar**0.5),
    }[prediction_type]


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float64).astype(np.float32)


# ----------------------------------------------------------------------------- builders


def _euler(cfg, cls_name, num_steps, timesteps, ancestral):
    for key in ("thresholding", "rescale_betas_zero_snr"):
        _check(cfg, cls_name, key, [False])
    alphas_cumprod = _alphas_cumprod(cfg, cls_name)
    train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # float32, like diffusers
    if ancestral:  # no sigma options in diffusers' ancestral Euler
        if timesteps is not None:
            raise ValueError(f"timesteps is not supported for {cls_name}; allowed: None")
        ts = _spaced_timesteps(cfg, cls_name, num_steps).astype(np.float32)
        sigmas = np.interp(ts, np.arange(len(train_sigmas)), train_sigmas)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    else:
        _check(cfg, cls_name, "interpolation_type", ["linear"])
        _check(cfg, cls_name, "timestep_type", ["discrete"])
        _check(cfg, cls_name, "final_sigmas_type", ["zero", "sigma_min"])
        for key in ("use_exponential_sigmas", "use_beta_sigmas"):
            _check(cfg, cls_name, key, [False, None])
        karras = bool(cfg["use_karras_sigmas"])
        if timesteps is not None and karras:
            raise ValueError(f"timesteps cannot be combined with use_karras_sigmas in {cls_name}; allowed: None")
        ts = _spaced_timesteps(cfg, cls_name, num_steps) if timesteps is None else timesteps
        ts = np.asarray(ts).astype(np.float32)
        sigmas = np.interp(ts, np.arange(len(train_sigmas)), train_sigmas)
        if karras:
            sigma_min = cfg["sigma_min"] if cfg["sigma_min"] is not None else float(sigmas[-1])
            sigma_max = cfg["sigma_max"] if cfg["sigma_max"] is not None else float(sigmas[0])
            sigmas = _karras(sigma_min, sigma_max, len(ts))
            ts = _sigma_to_t(sigmas, np.log(train_sigmas)).astype(np.float32)
        last = train_sigmas[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)

    max_sigma = float(sigmas.max())
    if cfg["timestep_spacing"] in ("linspace", "trailing"):
        init_noise_sigma = max_sigma
    else:
        init_noise_sigma = float(np.float32((max_sigma**2 + 1) ** 0.5))

    s = sigmas.astype(np.float64)
    sigma, sigma_next = s[:-1], s[1:]
    # x0 = a * sample + b * output on the unscaled sample (sigma-space, alpha = 1)
    x0_coefs = {
        "epsilon": (np.ones_like(sigma), -sigma),
        "v_prediction": (1 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5),
        "sample": (np.zeros_like(sigma), np.ones_like(sigma)),
    }
    allowed = ["epsilon", "v_prediction"] if ancestral else list(x0_coefs)
    _check(cfg, cls_name, "prediction_type", allowed)
    x0_a, x0_b = x0_coefs[cfg["prediction_type"]]
    if ancestral:
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    else:
        sigma_up, sigma_down = np.zeros_like(sigma), sigma_next
    return EulerSchedule(
        **_discrete_fields(ts, x0_a, x0_b, needs_noise=ancestral, init_noise_sigma=init_noise_sigma),
        input_scale=_f32(1 / (sigma**2 + 1) ** 0.5),
        sigmas=sigmas[:-1],
        sigma_down=_f32(sigma_down),
        sigma_up=_f32(sigma_up),
    )


def _ddim(cfg, cls_name, num_steps, timesteps):
    for key in ("thresholding", "rescale_betas_zero_snr"):
        _check(cfg, cls_name, key, [False])
    if timesteps is not None:
        raise ValueError(f"timesteps is not supported for {cls_name}; allowed: None")
    n_train = cfg["num_train_timesteps"]
    if num_steps > n_train:
        raise ValueError(f"num_inference_steps = {num_steps} is more than num_train_timesteps = {n_train}")
    ts = _spaced_timesteps(cfg, cls_name, num_steps)
    ts = ts.round().astype(np.int64)  # linspace is rounded only for DDIM
    alphas_cumprod = _alphas_cumprod(cfg, cls_name).astype(np.float64)
    final = 1.0 if cfg["set_alpha_to_one"] else alphas_cumprod[0]
    prev_ts = ts - n_train // num_steps
    a = alphas_cumprod[ts]
    a_prev = np.where(prev_ts >= 0, alphas_cumprod[np.maximum(prev_ts, 0)], final)
    x0_a, x0_b = _x0_coefs(cfg["prediction_type"], a**0.5, (1 - a) ** 0.5, cls_name)
    eps_a, eps_b = _eps_coefs(cfg["prediction_type"], a)
    return DDIMSchedule(
        **_discrete_fields(ts, x0_a, x0_b),
        eps_from_sample=_f32(eps_a),
        eps_from_output=_f32(eps_b),
        sqrt_alpha_prev=_f32(a_prev**0.5),
        sqrt_one_minus_alpha_prev=_f32((1 - a_prev) ** 0.5),
        clip_range=float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None,
    )


def _distilled_timesteps(cfg, cls_name, num_steps, timesteps) -> np.ndarray:
    """LCM's and TCD's int64 timesteps: custom ones checked, or evenly spaced indices into every
    k-th training timestep of the distillation schedule (original_inference_steps of them)."""
    for key in ("thresholding", "rescale_betas_zero_snr"):
        _check(cfg, cls_name, key, [False])
    n_train = cfg["num_train_timesteps"]
    original_steps = cfg["original_inference_steps"]
    if original_steps > n_train:
        _reject(cls_name, "original_inference_steps", original_steps, f"at most num_train_timesteps = {n_train}")
    if timesteps is not None:
        ts = np.asarray(timesteps).astype(np.int64)
        if np.any(np.diff(ts) >= 0) or ts[0] >= n_train:
            raise ValueError(f"timesteps = {list(ts)} must be strictly descending and below {n_train}")
    else:
        if num_steps > original_steps:
            raise ValueError(
                f"num_inference_steps = {num_steps} is more than original_inference_steps = {original_steps}"
            )
        # LCM's distillation schedule: every k-th training timestep, then evenly spaced indices into it.
        k = n_train // original_steps
        origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
        ts = origin[np.floor(np.linspace(0, original_steps, num_steps, endpoint=False)).astype(np.int64)]
    return ts


def _lcm(cfg, cls_name, num_steps, timesteps):
    ts = _distilled_timesteps(cfg, cls_name, num_steps, timesteps)
    alphas_cumprod = _alphas_cumprod(cfg, cls_name).astype(np.float64)
    final = 1.0 if cfg["set_alpha_to_one"] else alphas_cumprod[0]
    a = alphas_cumprod[ts]
    a_prev = np.where(ts[1:] >= 0, alphas_cumprod[np.maximum(ts[1:], 0)], final)
    x0_a, x0_b = _x0_coefs(cfg["prediction_type"], a**0.5, (1 - a) ** 0.5, cls_name)
    scaled = ts * float(cfg["timestep_scaling"])
    sigma_data = 0.5
    # the last step returns the denoised sample itself, no noise
    denoised_coef = np.concatenate([a_prev**0.5, [1.0]])
    noise_coef = np.concatenate([(1 - a_prev) ** 0.5, [0.0]])
    return LCMSchedule(
        **_discrete_fields(ts, x0_a, x0_b, needs_noise=True),
        c_skip=_f32(sigma_data**2 / (scaled**2 + sigma_data**2)),
        c_out=_f32(scaled / (scaled**2 + sigma_data**2) ** 0.5),
        denoised_coef=_f32(denoised_coef),
        noise_coef=_f32(noise_coef),
        clip_range=float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None,
    )


def _tcd(cfg, cls_name, num_steps, timesteps, eta):
    eta = 0.0 if eta is None else eta  # diffusers' pipelines pass eta=0.0 unless asked
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta = {eta!r} must be in [0, 1] for {cls_name}")
    ts = _distilled_timesteps(cfg, cls_name, num_steps, timesteps)
    alphas_cumprod = _alphas_cumprod(cfg, cls_name).astype(np.float64)
    prev_ts = np.concatenate([ts[1:], [0]])  # the last step aims at timestep 0
    s_ts = np.floor((1 - eta) * prev_ts).astype(np.int64)
    a, a_prev, a_s = alphas_cumprod[ts], alphas_cumprod[prev_ts], alphas_cumprod[s_ts]
    x0_a, x0_b = _x0_coefs(cfg["prediction_type"], a**0.5, (1 - a) ** 0.5, cls_name)
    eps_a, eps_b = _eps_coefs(cfg["prediction_type"], a)
    renoise = (np.arange(len(ts)) < len(ts) - 1) & (eta > 0)
    jump = np.where(renoise, (a_prev / a_s) ** 0.5, 1.0)  # the noised prediction at s, carried to prev
    return TCDSchedule(
        **_discrete_fields(ts, x0_a, x0_b, needs_noise=bool(renoise.any())),
        sample_coef=_f32(jump * (a_s**0.5 * x0_a + (1 - a_s) ** 0.5 * eps_a)),
        output_coef=_f32(jump * (a_s**0.5 * x0_b + (1 - a_s) ** 0.5 * eps_b)),
        noise_coef=_f32(np.where(renoise, np.sqrt(np.maximum(1 - a_prev / a_s, 0)), 0.0)),
    )


def flux_mu(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """Resolution-dependent shift exponent of the Flux pipelines: linear in the number of image
    tokens, base_shift at base_seq_len and max_shift at max_seq_len."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def flux_sigmas(num_inference_steps) -> np.ndarray:
    """The sigmas the diffusers Flux pipeline passes to the scheduler (before shifting)."""
    return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)


def _flow_euler(cfg, cls_name, num_steps, timesteps, sigmas, mu):
    unsupported = ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")
    for key in unsupported:
        _check(cfg, cls_name, key, [False, None])
    _check(cfg, cls_name, "time_shift_type", ["exponential", "linear"])
    n_train = cfg["num_train_timesteps"]
    shift = cfg["shift"]
    custom_timesteps = timesteps is not None
    if custom_timesteps:
        timesteps = np.asarray(timesteps).astype(np.float32)
    if cfg["use_dynamic_shifting"] and mu is None:
        raise ValueError(f"mu is required for {cls_name} with use_dynamic_shifting; see flux_mu()")
    if sigmas is not None:
        sigmas = np.asarray(sigmas).astype(np.float32)  # float32 from here on, as in diffusers
    else:
        if timesteps is None:
            # diffusers spans the (statically shifted) training range, then shifts again below
            train_min = np.float32(1.0) / np.float32(n_train)
            if cfg["use_dynamic_shifting"]:
                sigma_min = train_min
            else:
                sigma_min = np.float32(shift) * train_min / (1 + np.float32(shift - 1) * train_min)
            timesteps = np.linspace(n_train, float(sigma_min) * n_train, num_steps)
        sigmas = np.asarray(timesteps) / n_train
    if cfg["use_dynamic_shifting"]:
        if cfg["time_shift_type"] == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        else:
            sigmas = mu / (mu + (1 / sigmas - 1))
    else:
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if cfg["shift_terminal"]:
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - cfg["shift_terminal"]))
    sigmas = np.asarray(sigmas).astype(np.float32)
    # custom timesteps are fed to the model as given; otherwise t = 1000 * sigma
    ts = np.asarray(timesteps).astype(np.float32) if custom_timesteps else sigmas * np.float32(n_train)
    sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
    return FlowEulerSchedule(
        timesteps=ts,
        timestep_kind="flow",
        init_noise_sigma=1.0,
        needs_noise=False,
        sigmas=sigmas,
        dt=sigmas[1:] - sigmas[:-1],
    )


def make_schedule(scheduler_config: dict, num_inference_steps, *, timesteps=None, mu=None, name=None, sigmas=None,
                  eta=None):
    """Build the `Schedule` diffusers' scheduler would follow after `set_timesteps`.

    scheduler_config: the dict of a diffusers `scheduler_config.json`; its `_class_name` picks
      the scheduler unless `name` is given (one of SCHEDULER_CLASSES' keys or values).
    num_inference_steps: number of denoising steps (> 0); may be None when `timesteps` or
      `sigmas` give the schedule.
    timesteps: custom descending timesteps (Euler, DPM-Solver++, LCM, flow Euler), e.g. DMD2's
      [999, 749, 499, 249] for LCM.
    mu: the shift exponent for flow matching with `use_dynamic_shifting` (see `flux_mu`).
    sigmas: custom sigmas before shifting, flow Euler and UniPC only; the Flux pipelines pass
      `flux_sigmas(num_inference_steps)`, SD3 passes none.
    eta: TCD only (the diffusers pipelines' `eta`), in [0, 1]: 0 (the default) is deterministic,
      larger values re-noise more at each step (Hyper-SD suggests up to 1 for one step).
    """
    cls_name = scheduler_config.get("_class_name") if name is None else SCHEDULER_CLASSES.get(name, name)
    if cls_name not in _DEFAULTS and cls_name != "UniPCMultistepScheduler":
        which = "name" if name is not None else "scheduler_config['_class_name']"
        value = name if name is not None else scheduler_config.get("_class_name")
        allowed = sorted(SCHEDULER_CLASSES) + sorted(SCHEDULER_CLASSES.values())
        raise ValueError(f"{which} = {value!r} is not a supported scheduler; allowed: {allowed}")
    if timesteps is not None and sigmas is not None and len(timesteps) != len(sigmas):
        raise ValueError(f"timesteps ({len(timesteps)}) and sigmas ({len(sigmas)}) must have the same length")
    custom = timesteps if timesteps is not None else sigmas
    if custom is not None:
        if num_inference_steps is not None and num_inference_steps != len(custom):
            raise ValueError(
                f"num_inference_steps = {num_inference_steps} does not match the {len(custom)} custom "
                "timesteps/sigmas; pass None or their count"
            )
        num_inference_steps = len(custom)
    if num_inference_steps is None or int(num_inference_steps) <= 0:
        raise ValueError(f"num_inference_steps = {num_inference_steps!r} must be a positive integer")
    num_steps = int(num_inference_steps)
    if cls_name == "UniPCMultistepScheduler":  # flow sigmas only (Wan); in its own module
        from nag_jax.unipc import UNIPC_DEFAULTS, unipc_flow

        if timesteps is not None:
            raise ValueError(f"timesteps is not supported for {cls_name}; pass sigmas")
        cfg = {**UNIPC_DEFAULTS, **{k: v for k, v in scheduler_config.items() if k in UNIPC_DEFAULTS}}
        return unipc_flow(cfg, cls_name, num_steps, sigmas, mu)
    flow = cls_name == "FlowMatchEulerDiscreteScheduler"
    if sigmas is not None and not flow:
        raise ValueError(f"sigmas is only supported for FlowMatchEulerDiscreteScheduler, not {cls_name}")
    if mu is not None and not flow:
        raise ValueError(f"mu is only supported for FlowMatchEulerDiscreteScheduler, not {cls_name}")
    if eta is not None and cls_name != "TCDScheduler":
        raise ValueError(f"eta is only supported for TCDScheduler, not {cls_name}")
    defaults = _DEFAULTS[cls_name]
    cfg = {**defaults, **{k: v for k, v in scheduler_config.items() if k in defaults}}

    if cls_name == "EulerDiscreteScheduler":
        return _euler(cfg, cls_name, num_steps, timesteps, ancestral=False)
    if cls_name == "EulerAncestralDiscreteScheduler":
        return _euler(cfg, cls_name, num_steps, timesteps, ancestral=True)
    if cls_name == "DDIMScheduler":
        return _ddim(cfg, cls_name, num_steps, timesteps)
    if cls_name == "DPMSolverMultistepScheduler":  # in its own module
        from nag_jax.dpm_solver import dpmpp_2m

        return dpmpp_2m(cfg, cls_name, num_steps, timesteps)
    if cls_name == "LCMScheduler":
        return _lcm(cfg, cls_name, num_steps, timesteps)
    if cls_name == "TCDScheduler":
        return _tcd(cfg, cls_name, num_steps, timesteps, eta)
    return _flow_euler(cfg, cls_name, num_steps, timesteps, sigmas, mu)
