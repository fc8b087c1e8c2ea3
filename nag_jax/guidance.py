"""Guidance math as pure, jit-able functions of arrays (no Flax, no state).

`nag` is Normalized Attention Guidance (paper Sec. 4.1) in the reference's convention:
`nag_scale` is the paper's phi + 1; `nag_norm` picks the norm of its ratio ("l1": the paper and
the reference's SDXL/SD3/Wan processors; "l2": the reference's Flux and Flux Kontext processors). `cfg` and `nasa` are the output-space and unnormalized
attention-space baselines; the paper's ablations fall out of the parameters
(`nag_tau=inf`: no normalization, `nag_alpha=1`: no refinement).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

NAG_NORMS = ("l1", "l2")


def _exact_token_scale(*arrays):
    """A power of two per token bringing the largest magnitude near 1.

    Scaling by a power of two is exact, and NAG is homogeneous of degree one, so computing on
    the scaled values and scaling back changes no bits in the normal range while keeping the
    L1 sums of huge (or tiny, e.g. underflowing bf16) tokens finite and accurate.
    """
    peak = jnp.max(jnp.stack([jnp.max(jnp.abs(a), axis=-1, keepdims=True) for a in arrays]), axis=0)
    _, exponent = jnp.frexp(peak)
    return jnp.where(peak > 0, jnp.ldexp(jnp.ones_like(peak), exponent), 1.0)


def check_nag_norm(nag_norm: str) -> str:
    if nag_norm not in NAG_NORMS:
        raise ValueError(f"nag_norm must be one of {', '.join(NAG_NORMS)}, got {nag_norm!r}")
    return nag_norm


def nag(z_pos, z_neg, nag_scale, nag_tau, nag_alpha, nag_norm: str = "l1"):
    """Combine positive and negative attention outputs, per token over the last axis.

    z_tilde = s z_pos - (s - 1) z_neg; r = |z_tilde| / |z_pos| (L1 or, nag_norm="l2", L2);
    z_hat = z_tilde min(r, tau) / r; result = alpha z_hat + (1 - alpha) z_pos.

    Computed in float32 and returned in `z_pos.dtype`. The shrink is written without dividing
    by |z_pos|, so a zero-norm token gives a finite result: z_hat is 0 when z_pos is 0 (the
    limit, since |z_hat| <= tau |z_pos|), and z_tilde when both are 0.
    """
    check_nag_norm(nag_norm)
    out_dtype = z_pos.dtype
    pos = z_pos.astype(jnp.float32)
    neg = z_neg.astype(jnp.float32)
    token_scale = _exact_token_scale(pos, neg)
    pos, neg = pos / token_scale, neg / token_scale
    guided = nag_scale * pos - (nag_scale - 1.0) * neg
    # Norms from products with ones: XLA fuses a sum into its neighbours differently in a
    # one-device and a multi-device program (their roundings then differ); it never fuses a dot
    # that way, which keeps batch_invariant images equal across device counts. The token scale
    # keeps the squares of "l2" in range too.
    ones = jnp.ones((pos.shape[-1], 1), jnp.float32)

    def norm(x):
        if nag_norm == "l1":
            return jnp.matmul(jnp.abs(x), ones, precision=jax.lax.Precision.HIGHEST)
        return jnp.sqrt(jnp.matmul(x * x, ones, precision=jax.lax.Precision.HIGHEST))

    norm_pos, norm_guided = norm(pos), norm(guided)
    clipped = norm_guided > nag_tau * norm_pos  # r > tau, with no division
    shrink = jnp.where(clipped, nag_tau * norm_pos / jnp.where(clipped, norm_guided, 1.0), 1.0)
    refined = nag_alpha * (guided * shrink) + (1.0 - nag_alpha) * pos
    return (refined * token_scale).astype(out_dtype)


def nasa(z_pos, z_neg, phi):
    """Negative-Away Steer Attention (paper eq. 5): z_pos - phi z_neg, unnormalized."""
    return z_pos - phi * z_neg


def cfg(pred_uncond, pred_cond, guidance_scale):
    """Classifier-free guidance: uncond + g (cond - uncond) (paper eq. 3 with phi = g - 1)."""
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


def pag_scale_at(pag_scale, pag_adaptive_scale, timestep):
    """PAG's strength at `timestep` (diffusers' PAG pipelines): pag_scale, lowered by
    pag_adaptive_scale per unit of (1000 - t) and never below 0."""
    return jnp.maximum(pag_scale - pag_adaptive_scale * (1000.0 - timestep), 0.0)


def nag_end_cut(nag_end: float, timestep_kind: str) -> float:
    """The timestep below which NAG switches off for good (the reference's rule).

    `timestep_kind` is "discrete" for UNet families (timesteps 0..999: cut
    floor((1 - nag_end) * 999)) or "flow" for flow matching (t = 1000 sigma: cut
    (1 - nag_end) * 1000).
    """
    if not 0.0 < nag_end <= 1.0:
        raise ValueError(f"nag_end must be in (0, 1], got {nag_end!r}")
    if timestep_kind == "discrete":
        return float(math.floor((1.0 - nag_end) * 999))
    if timestep_kind == "flow":
        return (1.0 - nag_end) * 1000.0
    raise ValueError(f"timestep_kind must be 'discrete' or 'flow', got {timestep_kind!r}")


def nag_step_split(timesteps, nag_end: float, timestep_kind: str) -> int:
    """How many leading steps of a decreasing schedule run with NAG; a static int.

    NAG is on while t >= cut and off from the first step with t < cut, for the rest of the
    run, so the sampler can run two loops and the second never builds the negative branch.
    """
    return steps_at_or_above(timesteps, nag_end_cut(nag_end, timestep_kind))


def steps_at_or_above(timesteps, cut: float) -> int:
    """How many leading steps of a decreasing schedule come before the first with t < cut."""
    below = np.flatnonzero(np.asarray(timesteps, dtype=np.float64) < cut)
    return int(below[0]) if below.size else len(timesteps)
