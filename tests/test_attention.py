"""The one attention function and its log-sum-exp merge of key blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nag_jax.attention import attention, attention_partial, merge_heads, merge_partials


def numpy_attention(q, k, v, bias=None):
    scores = np.einsum("bqhd,bkhd->bhqk", q, k).astype(np.float64) / np.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def random_qkv(rng, batch, nq, nk, heads=3, dim=8, scale=1.0):
    q = rng.standard_normal((batch, nq, heads, dim)).astype(np.float32) * scale
    k = rng.standard_normal((batch, nk, heads, dim)).astype(np.float32) * scale
    v = rng.standard_normal((batch, nk, heads, dim)).astype(np.float32)
    return q, k, v


def test_attention_matches_numpy_with_bias():
    rng = np.random.default_rng(0)
    q, k, v = random_qkv(rng, 2, 5, 7)
    causal = np.where(np.tril(np.ones((5, 7)), 2) > 0, 0.0, -1e9)[None, None]
    np.testing.assert_allclose(attention(q, k, v, causal), numpy_attention(q, k, v, causal), rtol=1e-5, atol=1e-6)
    assert merge_heads(jnp.asarray(q)).shape == (2, 5, 24)


@pytest.mark.parametrize("score_scale", [1.0, 6.0])  # large scores exercise the max shift
def test_shared_key_merge_equals_attention_over_concatenated_keys(score_scale):
    """Image-key partials computed once serve both branches: merged with each branch's
    text-key partials they equal plain attention over [text; image] keys."""
    rng = np.random.default_rng(1)
    batch, image_tokens, text_tokens = 2, 12, 5
    img_q, img_k, img_v = random_qkv(rng, batch, image_tokens, image_tokens, scale=score_scale)
    _, pos_k, pos_v = random_qkv(rng, batch, 1, text_tokens, scale=score_scale)
    _, neg_k, neg_v = random_qkv(rng, batch, 1, text_tokens, scale=score_scale)

    @jax.jit
    def both_branches(img_q, img_k, img_v, pos_k, pos_v, neg_k, neg_v):
        shared = attention_partial(img_q, img_k, img_v)
        z_pos = merge_partials([shared, attention_partial(img_q, pos_k, pos_v)])
        z_neg = merge_partials([attention_partial(img_q, neg_k, neg_v), shared])
        return z_pos, z_neg

    z_pos, z_neg = both_branches(img_q, img_k, img_v, pos_k, pos_v, neg_k, neg_v)
    for z, (k_txt, v_txt) in ((z_pos, (pos_k, pos_v)), (z_neg, (neg_k, neg_v))):
        keys = np.concatenate([k_txt, img_k], axis=1)
        values = np.concatenate([v_txt, img_v], axis=1)
        np.testing.assert_allclose(z, attention(img_q, keys, values), rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(z, numpy_attention(img_q, keys, values), rtol=2e-5, atol=2e-5)


def test_partial_rows_selects_batch_rows():
    rng = np.random.default_rng(2)
    q, k, v = random_qkv(rng, 3, 4, 6)
    part = attention_partial(q, k, v)
    np.testing.assert_allclose(merge_partials([part.rows(slice(1, 3))]), attention(q[1:], k[1:], v[1:]), rtol=1e-6)


def test_bfloat16_attention_close_to_float32():
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, 2, 8, 8)
    out = attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), numpy_attention(q, k, v), atol=3e-2)
