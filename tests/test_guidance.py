"""NAG math against an independent NumPy version, numerics edge cases, CFG/NASA, nag_end split."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nag_jax.guidance import cfg, nag, nag_end_cut, nag_step_split, nasa


def numpy_nag(z_pos, z_neg, s, tau, alpha, norm="l1"):
    """Paper eqs. 7-10 in float64, written the obvious way (division by the ratio); `norm` "l2"
    is the reference's Flux processors' torch.norm(p=2)."""
    pos, neg = z_pos.astype(np.float64), z_neg.astype(np.float64)
    tilde = s * pos - (s - 1) * neg
    order = {"l1": 1, "l2": 2}[norm]
    ratio = np.linalg.norm(tilde, order, axis=-1, keepdims=True) / np.linalg.norm(pos, order, axis=-1, keepdims=True)
    hat = tilde * np.minimum(ratio, tau) / ratio
    return alpha * hat + (1 - alpha) * pos


@pytest.mark.parametrize("shape", [(2, 7, 16), (1, 3, 5, 64), (4, 128)])
@pytest.mark.parametrize("s,tau,alpha", [(3.0, 2.5, 0.5), (5.0, 2.5, 0.25), (2.0, 1.2, 1.0), (5.0, np.inf, 0.375)])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_nag_matches_numpy_float32(shape, s, tau, alpha, norm):
    rng = np.random.default_rng(0)
    z_pos = rng.standard_normal(shape).astype(np.float32)
    z_neg = (z_pos + rng.standard_normal(shape) * rng.uniform(0.05, 3.0, shape[:-1] + (1,))).astype(np.float32)
    expected = numpy_nag(z_pos, z_neg, s, tau, alpha, norm)
    got = np.asarray(jax.jit(nag, static_argnums=5)(z_pos, z_neg, s, tau, alpha, norm))
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)
    order = {"l1": 1, "l2": 2}[norm]
    ratio = np.linalg.norm(s * z_pos - (s - 1) * z_neg, order, axis=-1) / np.linalg.norm(z_pos, order, axis=-1)
    if np.isfinite(tau):  # the inputs cover tokens on both sides of the threshold
        assert (ratio > tau).any() and (ratio < tau).any()


def test_l1_and_l2_differ():
    """The two norms give different ratios, so the choice is visible (and the tests above can tell them apart)."""
    rng = np.random.default_rng(5)
    z_pos, z_neg = rng.standard_normal((2, 4, 32)).astype(np.float32)
    assert np.abs(np.asarray(nag(z_pos, z_neg, 5.0, 2.5, 0.25, "l1") - nag(z_pos, z_neg, 5.0, 2.5, 0.25, "l2"))).max() > 0.01


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="nag_norm must be one of l1, l2"):
        nag(np.ones((1, 4)), np.ones((1, 4)), 3.0, 2.5, 0.5, "linf")


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_nag_bfloat16_inputs_computed_in_float32(norm):
    rng = np.random.default_rng(1)
    z_pos = rng.standard_normal((3, 9, 32)).astype(ml_dtypes.bfloat16)
    z_neg = (z_pos.astype(np.float32) + rng.standard_normal((3, 9, 32))).astype(ml_dtypes.bfloat16)
    got = nag(jnp.asarray(z_pos), jnp.asarray(z_neg), 3.0, 2.5, 0.5, norm)
    assert got.dtype == jnp.bfloat16
    expected = numpy_nag(z_pos.astype(np.float32), z_neg.astype(np.float32), 3.0, 2.5, 0.5, norm)
    # only the final rounding to bfloat16 separates the two
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, rtol=1e-2, atol=1e-2)
    np.testing.assert_array_equal(np.asarray(got), expected.astype(np.float32).astype(ml_dtypes.bfloat16))


def test_nag_is_identity_when_branches_agree_or_scale_is_one():
    z = np.random.default_rng(2).standard_normal((2, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(nag(z, z, 5.0, 2.5, 0.25), z, rtol=1e-6)
    other = z[::-1]
    np.testing.assert_allclose(nag(z, other, 1.0, 2.5, 0.25), z, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_zero_norm_tokens_are_finite(dtype, norm):
    z_pos = jnp.zeros((2, 3, 8), dtype).at[0, 1].set(1.0)
    z_neg = jnp.ones((2, 3, 8), dtype)
    out = nag(z_pos, z_neg, 3.0, 2.5, 0.5, norm)
    assert jnp.all(jnp.isfinite(out.astype(jnp.float32)))
    # z_pos = 0: the clipped extrapolation vanishes (|z_hat| <= tau |z_pos|), and so does the blend
    np.testing.assert_array_equal(np.asarray(out[1], np.float32), 0.0)
    both_zero = nag(jnp.zeros((4, 8), dtype), jnp.zeros((4, 8), dtype), 3.0, 2.5, 0.5, norm)
    np.testing.assert_array_equal(np.asarray(both_zero, np.float32), 0.0)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_float16_token_below_normal_range_keeps_its_direction(norm):
    """A float16 token whose values are subnormal, so that its norm in float16 would be
    inaccurate or zero, gets the same NAG as the same token scaled up."""
    rng = np.random.default_rng(3)
    z_pos = rng.uniform(0.5, 1.0, (1, 16)) * rng.choice([-1, 1], (1, 16))
    z_neg = z_pos + rng.uniform(-1, 1, (1, 16))
    tiny = 2.0**-20  # float16 subnormals
    small = nag(jnp.asarray(z_pos * tiny, jnp.float16), jnp.asarray(z_neg * tiny, jnp.float16), 3.0, 2.5, 0.5, norm)
    pos16 = (z_pos * tiny).astype(np.float16).astype(np.float64)
    neg16 = (z_neg * tiny).astype(np.float16).astype(np.float64)
    reference = numpy_nag(pos16, neg16, 3.0, 2.5, 0.5, norm)
    assert np.abs(np.asarray(small, np.float64)).sum() > 0
    np.testing.assert_allclose(np.asarray(small, np.float64), reference, rtol=0.05, atol=2 * 2.0**-24)


finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=150, deadline=None)
@given(
    z_pos=hnp.arrays(np.float32, (3, 6), elements=finite32),
    z_neg=hnp.arrays(np.float32, (3, 6), elements=finite32),
    s=st.floats(1.0, 10.0),
    tau=st.floats(0.5, 10.0),
    alpha=st.floats(0.0, 1.0),
    norm=st.sampled_from(["l1", "l2"]),
)
def test_finite_inputs_give_finite_outputs(z_pos, z_neg, s, tau, alpha, norm):
    """The result is bounded by (2s - 1) max|inputs| (the shrink never enlarges), so whenever
    that fits in float32 the output must be finite, even though the norms of such tokens
    would overflow if computed directly."""
    bound = float(np.max(np.abs(np.concatenate([z_pos, z_neg]))))
    if bound * (2 * s - 1) >= 3.4e38:  # the true result might not fit: bring it into range
        z_pos, z_neg = z_pos / np.float32(2 * s), z_neg / np.float32(2 * s)
    out = np.asarray(nag(z_pos, z_neg, s, tau, alpha, norm))
    assert np.isfinite(out).all()


def test_ablations_fall_out_of_parameters():
    rng = np.random.default_rng(4)
    z_pos, z_neg = rng.standard_normal((2, 4, 8)).astype(np.float32)
    # tau = inf: no normalization; alpha = 1: no refinement -> plain extrapolation (NASA-like)
    np.testing.assert_allclose(nag(z_pos, z_neg, 3.0, np.inf, 1.0), 3 * z_pos - 2 * z_neg, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nasa(z_pos, z_neg, 2.0), z_pos - 2 * z_neg, rtol=1e-6)
    np.testing.assert_allclose(cfg(z_neg, z_pos, 7.5), z_neg + 7.5 * (z_pos - z_neg), rtol=1e-6)


def test_nag_end_split_follows_reference_cuts():
    discrete = np.array([999, 749, 499, 249])
    assert nag_end_cut(0.5, "discrete") == 499  # floor(0.5 * 999)
    assert nag_step_split(discrete, 1.0, "discrete") == 4
    assert nag_step_split(discrete, 0.5, "discrete") == 3  # 249 < 499 switches off
    assert nag_step_split(discrete, 0.25, "discrete") == 2  # cut floor(0.75 * 999) = 749: t = 749 stays on
    flow = 1000 * np.array([1.0, 0.75, 0.5, 0.25])
    assert nag_step_split(flow, 0.5, "flow") == 3
    assert nag_step_split(flow, 0.3, "flow") == 2  # cut 700: 1000 and 750 on, 500 off


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_nag_end_out_of_range(bad):
    with pytest.raises(ValueError, match="nag_end"):
        nag_step_split([999], bad, "discrete")
