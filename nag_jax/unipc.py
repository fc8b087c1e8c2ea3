"""UniPC multistep on flow sigmas (diffusers' `UniPCMultistepScheduler` with
`use_flow_sigmas=True`, `prediction_type="flow_prediction"`): the Wan pipelines' scheduler.

Each step converts the velocity to x0 = sample - sigma * v, corrects the sample with UniC
(from the previous step's predictor and this step's x0), then predicts the next sample with UniP
from the last `solver_order` x0 predictions. Both updates are linear in the sample, the last
sample and the x0 history, so their coefficients are per-step tables computed here in numpy
(float64, from the float32 sigmas diffusers holds); the traced step only weights and sums.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from nag_jax.schedulers import Schedule, _at, _check, _f32, _float32, _reject

UNIPC_DEFAULTS = {
    "num_train_timesteps": 1000,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
    "disable_corrector": [],
    "solver_p": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "final_sigmas_type": "zero",
    "use_dynamic_shifting": False,
    "shift_terminal": None,
}


@dataclasses.dataclass(frozen=True, eq=False)
class UniPCFlowSchedule(Schedule):
    """State: (the x0 predictions of the last solver_order steps [order, ...], newest last;
    the corrected sample of the previous step). With x0s = [x0 of this step, then the history
    newest first]:

    corrected = corrector[0] * sample + corrector[1] * last_sample + corrector[2:] . x0s
    next      = predictor[0] * corrected + predictor[1:] . x0s[:order]
    """

    sigmas: np.ndarray  # [num_steps] float32
    corrector: np.ndarray  # [num_steps, 3 + solver_order]
    predictor: np.ndarray  # [num_steps, 1 + solver_order]

    def init_state(self, sample):
        order = self.predictor.shape[1] - 1
        return jnp.zeros((order, *sample.shape), jnp.float32), jnp.zeros(sample.shape, jnp.float32)

    def step(self, state, step, model_output, sample, noise):
        x, v = _float32(sample, model_output)
        history, last = state
        x0 = x - _at(self.sigmas, step) * v
        x0s = jnp.concatenate([x0[None], history[::-1]])
        corrector = jnp.asarray(self.corrector, jnp.float32)[step]
        predictor = jnp.asarray(self.predictor, jnp.float32)[step]
        corrected = corrector[0] * x + corrector[1] * last + jnp.tensordot(corrector[2:], x0s, axes=1)
        prev = predictor[0] * corrected + jnp.tensordot(predictor[1:], x0s[: len(history)], axes=1)
        return prev.astype(sample.dtype), (jnp.concatenate([history[1:], x0[None]]), corrected)


def _solver_terms(lam, step, target, order, solver_type):
    """UniPC's (h_phi_1, B_h, rks, R, b) from step `step` to `target` using `order` x0s."""
    h = lam[target] - lam[step]
    hh = -h  # predict_x0
    h_phi_1 = math.expm1(hh)
    b_h = hh if solver_type == "bh1" else math.expm1(hh)
    rks = [(lam[step - k] - lam[step]) / h for k in range(1, order)] + [1.0]
    rows, b, h_phi_k, factorial = [], [], h_phi_1 / hh - 1, 1
    for i in range(1, order + 1):
        rows.append(np.power(rks, i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, np.asarray(rks), np.asarray(rows), np.asarray(b)


def _update(coefs, alpha, sigma, lam, step, target, order, solver_type, rhos_of, this_x0_weight=None):
    """Write into `coefs` (history weights, newest first) the UniPC update from `step` to
    `target` with `order`; returns the coefficient of the sample at `step`."""
    h_phi_1, b_h, rks, rows, b = _solver_terms(lam, step, target, order, solver_type)
    rhos = rhos_of(order, rows, b)
    coefs[0] += -alpha[target] * h_phi_1
    for k in range(1, order):  # D1_k = (x0_{step-k} - x0_step) / r_k, weighted by rho_k
        weight = -alpha[target] * b_h * rhos[k - 1] / rks[k - 1]
        coefs[k] += weight
        coefs[0] -= weight
    if this_x0_weight is not None:  # the corrector's D1_t = x0 of the new step - x0_step
        weight = -alpha[target] * b_h * rhos[-1]
        this_x0_weight[0] += weight
        coefs[0] -= weight
    return sigma[target] / sigma[step]


def unipc_flow(cfg, cls_name, num_steps, sigmas=None, mu=None):
    for key, allowed in [("use_flow_sigmas", [True]), ("prediction_type", ["flow_prediction"]),
                         ("predict_x0", [True]), ("solver_type", ["bh1", "bh2"]), ("solver_order", [1, 2, 3]),
                         ("thresholding", [False]), ("solver_p", [None]), ("use_karras_sigmas", [False]),
                         ("use_exponential_sigmas", [False]), ("use_beta_sigmas", [False]),
                         ("use_dynamic_shifting", [False]), ("shift_terminal", [None]),
                         ("final_sigmas_type", ["zero", "sigma_min"])]:
        _check(cfg, cls_name, key, allowed)
    if mu is not None:
        _reject(cls_name, "mu", mu, "None (use_dynamic_shifting is not supported)")
    if sigmas is None:
        sigmas = np.linspace(1, 1 / cfg["num_train_timesteps"], num_steps + 1)[:-1]
    sigmas = np.asarray(sigmas, np.float64)
    shift = cfg["flow_shift"]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if abs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6
    timesteps = (sigmas * cfg["num_train_timesteps"]).astype(np.int64)  # diffusers feeds these integers
    last = sigmas[-1] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32).astype(np.float64)
    alpha = 1 - sigmas
    with np.errstate(divide="ignore", invalid="ignore"):  # the final sigma may be 0: lambda = inf
        lam = np.log(alpha) - np.log(sigmas)

    n, order, solver_type = len(timesteps), cfg["solver_order"], cfg["solver_type"]
    predictor, corrector = np.zeros((n, 1 + order)), np.zeros((n, 3 + order))
    predictor_orders = []

    def rhos_p(p, rows, b):
        return [0.5] if p == 2 else (np.linalg.solve(rows[:-1, :-1], b[:-1]) if p > 2 else [])

    def rhos_c(p, rows, b):
        return [0.5] if p == 1 else np.linalg.solve(rows, b)

    for i in range(n):
        if i > 0 and (i - 1) not in cfg["disable_corrector"]:
            # the corrector of step i-1 -> i with the order its predictor used; column 2 + j weights x0_{i-j}
            history = np.zeros(order + 1)
            this_x0 = np.zeros(1)
            with np.errstate(divide="ignore", invalid="ignore"):
                corrector[i, 1] = _update(history[1:], alpha, sigmas, lam, i - 1, i, predictor_orders[-1], solver_type,
                                          rhos_c, this_x0)
            history[0] = this_x0[0]
            corrector[i, 2:] = history
        else:
            corrector[i, 0] = 1.0
        p = min(order, n - i) if cfg["lower_order_final"] else order
        p = min(p, i + 1)
        predictor_orders.append(p)
        with np.errstate(divide="ignore", invalid="ignore"):
            predictor[i, 0] = _update(predictor[i, 1:], alpha, sigmas, lam, i, i + 1, p, solver_type, rhos_p)
    return UniPCFlowSchedule(timesteps=timesteps.astype(np.float32), timestep_kind="flow", init_noise_sigma=1.0,
                             needs_noise=False, sigmas=_f32(sigmas[:-1]), corrector=_f32(corrector),
                             predictor=_f32(predictor))
