"""The interceptor on small Flax models: NAG where registered, nothing anywhere else."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from models.layers import CrossAttentionCore, JointAttentionCore, SelfAttentionCore
from nag_jax import NAGConfig, guided
from nag_jax.intercept import guidance_of

HEADS, HEAD_DIM = 2, 8
WIDTH = HEADS * HEAD_DIM


def split_heads(x):
    return x.reshape(*x.shape[:-1], HEADS, HEAD_DIM)


class TinyCrossAttentionBlock(nn.Module):
    """Self-attention then cross-attention, as in a UNet transformer block."""

    @nn.compact
    def __call__(self, x, context):
        q, k, v = (split_heads(nn.Dense(WIDTH, name=f"self_{n}")(x)) for n in "qkv")
        x = x + nn.Dense(WIDTH, name="self_out")(SelfAttentionCore()(q, k, v))
        q = split_heads(nn.Dense(WIDTH, name="cross_q")(x))
        k = split_heads(nn.Dense(WIDTH, name="cross_k")(context))
        v = split_heads(nn.Dense(WIDTH, name="cross_v")(context))
        return x + nn.Dense(WIDTH, name="cross_out")(CrossAttentionCore()(q, k, v))


def numpy_softmax_attention(q, k, v):
    q, k, v = (np.asarray(a, np.float64).reshape(*a.shape[:-1], HEADS, HEAD_DIM) for a in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", w, v)
    return out.reshape(*out.shape[:2], WIDTH)


def numpy_nag(z_pos, z_neg, s, tau, alpha):
    tilde = s * z_pos - (s - 1) * z_neg
    r = np.abs(tilde).sum(-1, keepdims=True) / np.abs(z_pos).sum(-1, keepdims=True)
    return alpha * tilde * np.minimum(r, tau) / r + (1 - alpha) * z_pos


def dense(params, name, x):
    return np.asarray(x, np.float64) @ np.asarray(params[name]["kernel"]) + np.asarray(params[name]["bias"])


def numpy_block(params, x, context_pos, context_neg, nag_rows, config):
    """The block by hand: NAG on the cross-attention output of the last `nag_rows` rows."""
    q, k, v = (dense(params, f"self_{n}", x) for n in "qkv")
    h = x + dense(params, "self_out", numpy_softmax_attention(q, k, v))
    q = dense(params, "cross_q", h)
    z = numpy_softmax_attention(q, dense(params, "cross_k", context_pos), dense(params, "cross_v", context_pos))
    if nag_rows:
        rows = slice(x.shape[0] - nag_rows, None)
        z_neg = numpy_softmax_attention(q[rows], dense(params, "cross_k", context_neg), dense(params, "cross_v", context_neg))
        z[rows] = numpy_nag(z[rows], z_neg, config.nag_scale, config.nag_tau, config.nag_alpha)
    return h + dense(params, "cross_out", z)


@pytest.fixture(scope="module")
def block():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6, WIDTH)).astype(np.float32)
    pos = rng.standard_normal((4, 5, 12)).astype(np.float32)
    neg = rng.standard_normal((4, 5, 12)).astype(np.float32)
    model = TinyCrossAttentionBlock()
    params = model.init(jax.random.key(0), x, pos)["params"]
    return model, params, x, pos, neg


def run(model, params, x, context, config=None):
    def forward(params, x, context):
        if config is None:
            return model.apply({"params": params}, x, context)
        with guided(config):
            return model.apply({"params": params}, x, context)

    return jax.jit(forward)(params, x, context)


CONFIG = NAGConfig(nag_scale=3.0, nag_tau=2.5, nag_alpha=0.5)


def test_nag_alone_equals_hand_computed_reference(block):
    model, params, x, pos, neg = block
    out = run(model, params, x, np.concatenate([pos, neg]), CONFIG)
    expected = numpy_block(params, x, pos, neg, nag_rows=4, config=CONFIG)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(out - run(model, params, x, pos)).max() > 1e-2  # NAG did change something


def test_cfg_layout_leaves_uncond_rows_untouched(block):
    model, params, x, pos, neg = block
    # image rows [uncond (2); cond (2)]; context [uncond; cond; negatives for the cond rows]
    context = np.concatenate([pos, neg[2:]])
    out = run(model, params, x, context, CONFIG)
    plain = run(model, params, x, pos)
    np.testing.assert_array_equal(out[:2], plain[:2])
    np.testing.assert_allclose(out, numpy_block(params, x, pos, neg[2:], nag_rows=2, config=CONFIG), rtol=1e-4, atol=1e-5)


def test_traced_parameters_do_not_recompile(block):
    model, params, x, pos, neg = block

    @jax.jit
    def forward(params, x, context, scale, tau, alpha):
        with guided(NAGConfig(scale, tau, alpha)):
            return model.apply({"params": params}, x, context)

    context = np.concatenate([pos, neg])
    first = forward(params, x, context, 3.0, 2.5, 0.5)
    second = forward(params, x, context, 5.0, 2.5, 0.25)
    assert forward._cache_size() == 1
    np.testing.assert_allclose(second, numpy_block(params, x, pos, neg, 4, NAGConfig(5.0, 2.5, 0.25)), rtol=1e-4, atol=1e-5)
    assert not np.allclose(first, second)


def compiled_flops(fn, *args):
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_nag_off_is_bit_identical_and_skips_the_negative_branch(block, scale):
    model, params, x, pos, neg = block
    plain = run(model, params, x, pos)
    off = NAGConfig(nag_scale=scale)
    np.testing.assert_array_equal(run(model, params, x, pos, off), plain)
    np.testing.assert_array_equal(run(model, params, x, np.concatenate([pos, neg]), off), plain)

    def apply_off(params, x, context):
        with guided(off):
            return model.apply({"params": params}, x, context)

    def apply_plain(params, x, context):
        return model.apply({"params": params}, x, context)

    def apply_on(params, x, context):
        with guided(CONFIG):
            return model.apply({"params": params}, x, context)

    assert compiled_flops(apply_off, params, x, pos) == compiled_flops(apply_plain, params, x, pos)
    both = np.concatenate([pos, neg])
    assert compiled_flops(apply_on, params, x, both) > compiled_flops(apply_off, params, x, both)


def test_nothing_changes_outside_the_context(block):
    model, params, x, pos, neg = block
    before = run(model, params, x, pos)
    run(model, params, x, np.concatenate([pos, neg]), CONFIG)
    np.testing.assert_array_equal(run(model, params, x, pos), before)
    with pytest.raises(ValueError, match="only meaningful inside nag_jax.guided"):
        run(model, params, x, np.concatenate([pos, neg]))
    assert guidance_of(CrossAttentionCore) == {"nag"} and "nag" not in guidance_of(SelfAttentionCore)


class TinyJointBlock(nn.Module):
    @nn.compact
    def __call__(self, txt, img):
        tq, tk, tv = (split_heads(nn.Dense(WIDTH, name=f"txt_{n}")(txt)) for n in "qkv")
        iq, ik, iv = (split_heads(nn.Dense(WIDTH, name=f"img_{n}")(img)) for n in "qkv")
        txt_out, img_out = JointAttentionCore()(tq, tk, tv, iq, ik, iv)
        return txt + txt_out, img + img_out


def test_joint_attention_nag_equals_two_concatenated_branches():
    rng = np.random.default_rng(1)
    img = rng.standard_normal((2, 9, WIDTH)).astype(np.float32)
    txt = rng.standard_normal((3, 4, WIDTH)).astype(np.float32)  # [pos (2); neg for the last row]
    model = TinyJointBlock()
    params = model.init(jax.random.key(1), txt[:2], img)["params"]
    config = NAGConfig(nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25)

    @jax.jit
    def forward(params, txt, img):
        with guided(config):
            return model.apply({"params": params}, txt, img)

    txt_out, img_out = forward(params, txt, img)

    def projections(prefix, h):
        return [dense(params, f"{prefix}_{n}", h) for n in "qkv"]

    tq, tk, tv = projections("txt", txt)
    iq, ik, iv = projections("img", img)
    image_rows = [0, 1, 1]  # the image row each text row belongs to
    joined = [np.concatenate([t, i[image_rows]], axis=1) for t, i in ((tq, iq), (tk, ik), (tv, iv))]
    branch = numpy_softmax_attention(*joined)  # every text row over [its text; its image]
    np.testing.assert_allclose(txt_out, txt + branch[:, :4], rtol=1e-4, atol=1e-5)
    z_img = branch[:2, 4:].copy()
    z_img[1] = numpy_nag(branch[1, 4:], branch[2, 4:], 5.0, 2.5, 0.25)
    np.testing.assert_allclose(img_out, img + z_img, rtol=1e-4, atol=1e-5)
