"""Blockwise (online-softmax) attention at long lengths, the backend switch and the kernels' wrappers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nag_jax.attention import (BLOCK_K, BLOCK_Q, Partial, attention, attention_backend, attention_partial,
                               choose_backend, current_backend, merge_partials, splash_attention)

MASKED = -1e9  # as models/t5.py and models/clip.py mask keys


def float64_attention(q, k, v, bias=None, scale=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if bias is not None:
        scores = scores + bias
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), v)


def random(rng, shape, scale=1.0):
    return rng.standard_normal(shape).astype(np.float32) * scale


def t5_bias(rng, heads, q_tokens, k_tokens, batch):
    """T5's layout: a relative-position bias [1, H, Nq, Nk] plus a text padding mask [B, 1, 1, Nk]."""
    padding = np.where(np.arange(k_tokens) < k_tokens - 37 * np.arange(1, batch + 1)[:, None], 0.0, MASKED)
    return random(rng, (1, heads, q_tokens, k_tokens)) + padding[:, None, None, :].astype(np.float32)


def clip_causal(rng, heads, q_tokens, k_tokens, batch):
    """CLIP's layout: a causal mask [1, 1, Nq, Nk]."""
    return np.where(np.tril(np.ones((q_tokens, k_tokens))) > 0, 0.0, MASKED).astype(np.float32)[None, None]


CASES = {  # name: (batch, query tokens, key tokens, bias builder); lengths not multiples of the blocks
    "self": (1, 3001, 3001, None),
    "cross-uneven": (2, 4100, 3333, None),
    "t5-bias-and-padding": (2, 3100, 3100, t5_bias),
    "clip-causal": (1, 3077, 3077, clip_causal),
}


@pytest.mark.parametrize("case", list(CASES))
def test_blockwise_matches_float64_softmax(case):
    batch, q_tokens, k_tokens, make_bias = CASES[case]
    assert q_tokens > BLOCK_Q and k_tokens > BLOCK_K and q_tokens % BLOCK_Q and k_tokens % BLOCK_K
    rng = np.random.default_rng(0)
    heads, dim = 2, 16
    q, k = random(rng, (batch, q_tokens, heads, dim), 2.0), random(rng, (batch, k_tokens, heads, dim), 2.0)
    v = random(rng, (batch, k_tokens, heads, dim))
    bias = None if make_bias is None else make_bias(rng, heads, q_tokens, k_tokens, batch)
    assert choose_backend("auto", "cpu", q.dtype, dim, q_tokens, k_tokens, bias is not None) == "blockwise"
    out = jax.jit(attention)(q, k, v, bias)
    np.testing.assert_allclose(out, float64_attention(q, k, v, bias), atol=1e-5, rtol=1e-5)


def test_blockwise_partials_merge_like_nag_shared_image_keys():
    """NAG's shared image-key partial at a long length, merged with a text partial, equals attention
    over [text; image] keys; the image partial itself is the merge of its key blocks."""
    rng = np.random.default_rng(1)
    batch, image, text, heads, dim = 1, 3100, 77, 2, 16
    img_q, img_k = random(rng, (batch, image, heads, dim), 2.0), random(rng, (batch, image, heads, dim), 2.0)
    img_v = random(rng, (batch, image, heads, dim))
    txt_k, txt_v = random(rng, (batch, text, heads, dim), 2.0), random(rng, (batch, text, heads, dim))
    merged = jax.jit(lambda *x: merge_partials([attention_partial(*x[:3]), attention_partial(x[0], *x[3:])]))(
        img_q, img_k, img_v, txt_k, txt_v)
    expected = float64_attention(img_q, np.concatenate([img_k, txt_k], 1), np.concatenate([img_v, txt_v], 1))
    np.testing.assert_allclose(merged, expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_blockwise_as_accurate_as_one_block():
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(random(rng, (1, 3001, 2, 64), s), jnp.bfloat16) for s in (2.0, 2.0, 1.0))
    expected = float64_attention(q, k, v)
    errors = {}
    for backend in ("xla", "blockwise"):
        with attention_backend(backend):
            out = jax.jit(attention)(q, k, v)
        assert out.dtype == jnp.bfloat16
        errors[backend] = np.abs(np.asarray(out, np.float64) - expected).max()
    assert errors["blockwise"] <= 1.1 * errors["xla"] and errors["blockwise"] < 2e-2, errors


def test_fully_masked_row_matches_one_block():
    """A query whose keys are all masked (-1e9 swallows the scores in float32) averages the values
    uniformly in both implementations, without NaN."""
    rng = np.random.default_rng(3)
    q, k, v = (random(rng, (1, 1100, 2, 8)) for _ in range(3))
    bias = np.zeros((1, 1, 1100, 1100), np.float32)
    bias[..., 5, :] = MASKED
    outputs = []
    for backend in ("xla", "blockwise"):
        with attention_backend(backend):
            outputs.append(jax.jit(attention)(q, k, v, bias))
    np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-6)
    np.testing.assert_allclose(outputs[1][0, 5], np.broadcast_to(v[0].mean(0), (2, 8)), atol=1e-6)


def test_blockwise_attention_memory_stays_linear():
    """One attention call at Flux 1024^2 (4608 tokens, 24 heads x 128) in bf16 compiles to far less
    than its 2 GiB float32 score matrix (the one-block path)."""
    spec = jax.ShapeDtypeStruct((1, 4608, 24, 128), jnp.bfloat16)
    temporary = jax.jit(attention).lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes
    assert temporary <= 0.25 * 2**30, temporary / 2**30


def test_log_sum_exp_in_bfloat16_too_coarse_for_merging():
    """Why partials never come from cuDNN (whose residual is cast to the input dtype): merging two
    partials whose log-sum-exp is rounded to bf16 errs by ~1e-2, in float32 by ~1e-6."""
    rng = np.random.default_rng(4)
    q, k, txt_k = (random(rng, shape, 1.5) for shape in ((1, 2048, 4, 64), (1, 2048, 4, 64), (1, 77, 4, 64)))
    v, txt_v = random(rng, (1, 2048, 4, 64)), random(rng, (1, 77, 4, 64))
    parts = [attention_partial(q, k, v), attention_partial(q, txt_k, txt_v)]
    expected = float64_attention(q, np.concatenate([k, txt_k], 1), np.concatenate([v, txt_v], 1))
    errors = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        lse = [(p.max + jnp.log(p.denom)).astype(dtype).astype(jnp.float32) for p in parts]
        normalized = [Partial(p.out / p.denom, x, jnp.ones_like(x)) for p, x in zip(parts, lse)]
        errors[jnp.dtype(dtype).name] = np.abs(np.asarray(merge_partials(normalized), np.float64) - expected).max()
    assert errors["float32"] < 1e-5 and errors["bfloat16"] > 1e-3, errors


def test_splash_wrapper_in_interpret_mode():
    """The TPU splash kernel (run by Pallas' interpreter on CPU): uneven lengths padded to tiles, head
    dim 64 padded to 128, and its float32 log-sum-exp turning into a mergeable partial."""
    rng = np.random.default_rng(5)
    q, k, v = random(rng, (2, 200, 2, 64), 2.0), random(rng, (2, 300, 2, 64), 2.0), random(rng, (2, 300, 2, 64))
    out, lse = splash_attention(q, k, v, 0.125, save_residuals=True, interpret=True)
    np.testing.assert_allclose(out, float64_attention(q, k, v), atol=1e-5)
    scores = np.einsum("bqhd,bkhd->bqhk", q.astype(np.float64), k) * 0.125
    peak = scores.max(-1, keepdims=True)
    np.testing.assert_allclose(lse, peak + np.log(np.exp(scores - peak).sum(-1, keepdims=True)), atol=1e-4)
    assert lse.dtype == jnp.float32 and lse.shape == (2, 200, 2, 1)


@pytest.mark.parametrize("backend, platform, dtype, head_dim, tokens, bias, partial, expected", [
    ("auto", "cpu", "float32", 64, 77, False, False, "xla"),
    ("auto", "cpu", "bfloat16", 128, 4608, False, False, "blockwise"),
    ("auto", "cpu", "bfloat16", 128, 4608, False, True, "blockwise"),
    ("auto", "gpu", "bfloat16", 128, 4608, False, False, "cudnn"),
    ("auto", "gpu", "float16", 64, 77, False, False, "cudnn"),
    ("auto", "gpu", "bfloat16", 128, 4608, False, True, "blockwise"),  # partial: log-sum-exp too coarse
    ("auto", "gpu", "float32", 128, 4608, False, False, "blockwise"),  # cuDNN wants half precision
    ("auto", "gpu", "bfloat16", 256, 4608, False, False, "blockwise"),  # head dim over the limit
    ("auto", "gpu", "bfloat16", 64, 77, True, False, "xla"),  # bias (T5, CLIP masks)
    ("cudnn", "gpu", "bfloat16", 128, 4608, False, True, "blockwise"),
    ("auto", "tpu", "bfloat16", 64, 4429, False, True, "splash"),
    ("splash", "tpu", "float32", 128, 4608, False, False, "splash"),
    ("splash", "tpu", "bfloat16", 64, 77, True, False, "xla"),
    ("xla", "gpu", "bfloat16", 128, 75600, False, False, "xla"),
    ("blockwise", "tpu", "bfloat16", 128, 77, False, False, "blockwise"),
])
def test_choose_backend(backend, platform, dtype, head_dim, tokens, bias, partial, expected):
    assert choose_backend(backend, platform, dtype, head_dim, tokens, tokens, bias, partial) == expected


@pytest.mark.parametrize("backend", ["cudnn", "splash"])
def test_kernel_on_wrong_platform_is_a_clear_error(backend):
    q = jnp.zeros((1, 16, 2, 8), jnp.bfloat16)
    with attention_backend(backend), pytest.raises(ValueError, match=f"attention_backend='{backend}' needs a"):
        attention(q, q, q)


def test_backend_context_validates_and_restores():
    with pytest.raises(ValueError, match="attention_backend must be one of auto, xla, blockwise, cudnn, splash"):
        with attention_backend("flash"):
            pass
    with attention_backend("blockwise"):
        assert current_backend() == "blockwise"
    assert current_backend() == "auto"
