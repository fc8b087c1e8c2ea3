"""The one attention function every model uses, built from mergeable partial results.

`attention_partial` computes softmax attention over a set of keys without normalizing, keeping
the running max and denominator; `merge_partials` combines partials by a log-sum-exp merge.
Attention over concatenated key blocks equals the merge of the blocks' partials, which lets NAG
compute image-key scores once and share them between the positive and negative branches
(nag-semantics.md section 2). Plain `attention` is the one-partial case.

Long sequences never hold the [Nq, Nk] score matrix: the blockwise implementation walks query
blocks (`BLOCK_Q`) and, for each, key blocks (`BLOCK_K`) with an online softmax, so memory is
O(N x D) plus one block of scores. A blockwise partial is itself the merge of its key blocks'
partials. Which implementation runs is decided at trace time by `choose_backend` from the
`attention_backend` context (docs/attention.md): "xla" (one score block), "blockwise", the
cuDNN fused kernel on GPU, the Pallas splash kernel on TPU, or "auto".

Layout: q [B, Nq, H, D], k and v [B, Nk, H, D]; results [B, Nq, H, D].
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

BACKENDS = ("auto", "xla", "blockwise", "cudnn", "splash")
BLOCK_Q, BLOCK_K = 512, 512  # tokens per query / key block of the blockwise implementation
QUERY_CHUNKS = 8  # loops the query blocks are split into (each copies only its queries on XLA:CPU)
ONE_BLOCK_SCORES = 1024 * 1024  # up to this many query x key scores "auto" keeps one block (faster)
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128
SPLASH_LANES, SPLASH_BLOCK = 128, 512  # splash tiles: head dims pad to lanes, sequences to whole blocks

_backend = contextvars.ContextVar("attention_backend", default="auto")


class Partial(NamedTuple):
    """Unnormalized attention over a key set: out / denom is that set's softmax result."""

    out: jax.Array  # [B, Nq, H, D] float32, sum_k exp(s - max) v
    max: jax.Array  # [B, Nq, H, 1] float32, max_k s
    denom: jax.Array  # [B, Nq, H, 1] float32, sum_k exp(s - max)

    def rows(self, index) -> "Partial":
        """The same partial for a subset of batch rows."""
        return Partial(*(x[index] for x in self))


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


@contextlib.contextmanager
def attention_backend(name: str):
    """Within this context, attention calls traced use backend `name` (one of BACKENDS).

    Read while tracing: a function jitted inside the context keeps the choice it was traced with."""
    token = _backend.set(check_backend(name))
    try:
        yield
    finally:
        _backend.reset(token)


def current_backend() -> str:
    return _backend.get()


def with_attention_backend(function, name: str):
    """`function` tracing its attention calls with backend `name`."""
    check_backend(name)

    def wrapped(*args, **kwargs):
        with attention_backend(name):
            return function(*args, **kwargs)

    return wrapped


def cudnn_applies(dtype, head_dim: int, has_bias: bool) -> bool:
    """cuDNN flash attention takes half-precision inputs, head dims that are multiples of 8 up to 128."""
    return jnp.dtype(dtype).name in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM \
        and not has_bias


def choose_backend(backend: str, platform: str, dtype, head_dim: int, q_tokens: int, k_tokens: int,
                   has_bias: bool = False, partial: bool = False) -> str:
    """The implementation one attention call uses: "xla" (one score block), "blockwise", "cudnn" or "splash".

    `platform` is jax's backend name ("cpu", "gpu", "tpu"); `partial` says the caller needs a
    mergeable partial (float32 log-sum-exp), which cuDNN's residual, cast to the input dtype,
    is too coarse for (docs/attention.md). A kernel that does not apply to a call (bias, dtype,
    head dim) falls back to the default; asking for a kernel the platform lacks is an error.
    """
    check_backend(backend)
    default = "xla" if q_tokens * k_tokens <= ONE_BLOCK_SCORES else "blockwise"
    if backend in ("xla", "blockwise"):
        return backend
    kernels = {"cudnn": "gpu", "splash": "tpu"}
    if backend in kernels and platform != kernels[backend]:
        raise ValueError(f"attention_backend={backend!r} needs a {kernels[backend].upper()} (running on "
                         f"{platform}); use 'auto', 'xla' or 'blockwise'")
    if backend in ("auto", "cudnn") and platform == "gpu" and not partial and cudnn_applies(dtype, head_dim, has_bias):
        return "cudnn"
    if backend in ("auto", "splash") and platform == "tpu" and not has_bias:
        return "splash"
    return default


def _implementation(q, k, bias, partial: bool) -> str:
    return choose_backend(current_backend(), jax.default_backend(), q.dtype, q.shape[-1], q.shape[1], k.shape[1],
                          bias is not None, partial)


def _bias4(bias):
    """Bias broadcastable to [B, H, Nq, Nk] with the missing leading axes added."""
    return None if bias is None else jnp.reshape(bias, (1,) * (4 - bias.ndim) + bias.shape)


def _scaled(q, scale):
    """q * scale in q's dtype: scaling the [Nq, H, D] queries rather than the [H, Nq, Nk] scores
    saves XLA:CPU a pass over the score matrix (the fused kernels scale q the same way)."""
    return (q * scale).astype(q.dtype)


def _one_block(q, k, v, bias, scale, softcap=None) -> Partial:
    """Every score of q against k at once (float32), exponentiated against their max; `softcap`
    (Gemma-2's attention-logit soft-capping) makes scores softcap * tanh(scores / softcap) before the bias."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", _scaled(q, scale), k, preferred_element_type=jnp.float32)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - peak)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    # v to [B, H, Nk, D] rather than the weights to [B, H, Nk, Nq]: XLA:CPU would copy the whole
    # score-sized weights to contract them over keys in the [B, Nk, H, D] layout
    out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), jnp.transpose(v, (0, 2, 1, 3)),
                     preferred_element_type=jnp.float32)
    to_bqh = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # noqa: E731 [B,H,Nq,*] -> [B,Nq,H,*]
    return Partial(to_bqh(out), to_bqh(peak), to_bqh(denom))


def _slice_if_full(x, start, size: int, axis: int):
    """x's block [start, start + size) along `axis`, unless x broadcasts along it (length 1)."""
    return x if x.shape[axis] == 1 else lax.dynamic_slice_in_dim(x, start, size, axis)


def _blockwise(q, k, v, bias, scale, finish):
    """Online softmax over key blocks, one query block at a time.

    `finish(out, max, denom)` turns a query block's sums ([B, Bq, H, D], [B, Bq, H, 1] twice,
    float32) into the arrays written to the result ([B, Bq, ...] each). The last block along
    each axis starts early so that every block is full: overlapping queries are computed
    twice (same values), overlapping keys are masked out of the later block. The query blocks
    run as up to QUERY_CHUNKS loops one after the other, each over its own slice of the queries
    (the start of the next slice is the previous loop's output, so the slices are copied one at
    a time): on XLA:CPU a loop holds its half-precision inputs as uint16 bits (`_to_bits`), a
    copy, so this copies one slice of q at a time (k and v once), and the results are written in
    place in their final dtype.
    """
    dtypes = q.dtype, k.dtype, v.dtype
    k, v = _to_bits(k), _to_bits(v)
    q_tokens, k_tokens = q.shape[1], k.shape[1]
    block_q, block_k = min(q_tokens, BLOCK_Q), min(k_tokens, BLOCK_K)
    q_blocks, k_blocks = -(-q_tokens // block_q), -(-k_tokens // block_k)
    batch, heads, head_dim = q.shape[0], q.shape[2], v.shape[3]

    def query_block(q_rows, first_row, i):
        """Block i of the queries; `q_rows` (bits) holds the queries from `first_row` on."""
        start_q = jnp.minimum(i * block_q, q_tokens - block_q)
        q_block = _scaled(_from_bits(lax.dynamic_slice_in_dim(q_rows, start_q - first_row, block_q, 1), dtypes[0]), scale)
        bias_q = None if bias is None else _slice_if_full(bias, start_q, block_q, 2)

        def key_block(carry, j):
            out, peak, denom = carry
            start_k = jnp.minimum(j * block_k, k_tokens - block_k)
            k_block, v_block = (_from_bits(lax.dynamic_slice_in_dim(x, start_k, block_k, 1), dtype)
                                for x, dtype in ((k, dtypes[1]), (v, dtypes[2])))
            scores = jnp.einsum("bqhd,bkhd->bhqk", q_block, k_block, preferred_element_type=jnp.float32)
            if bias_q is not None:
                scores = scores + _slice_if_full(bias_q, start_k, block_k, 3).astype(jnp.float32)
            if k_tokens % block_k:  # keys the previous block already counted
                scores = jnp.where(start_k + jnp.arange(block_k) >= j * block_k, scores, -jnp.inf)
            new_peak = jnp.maximum(peak, jnp.max(scores, axis=-1, keepdims=True))
            weights = jnp.exp(scores - new_peak)
            rescale = jnp.exp(peak - new_peak)  # 0 on the first block (peak = -inf)
            out = out * rescale + jnp.einsum("bhqk,bkhd->bhqd", weights.astype(dtypes[2]), v_block,
                                             preferred_element_type=jnp.float32)
            return (out, new_peak, denom * rescale + jnp.sum(weights, axis=-1, keepdims=True)), None

        init = (jnp.zeros((batch, heads, block_q, head_dim), jnp.float32),
                jnp.full((batch, heads, block_q, 1), -jnp.inf, jnp.float32),
                jnp.zeros((batch, heads, block_q, 1), jnp.float32))
        sums, _ = lax.scan(key_block, init, jnp.arange(k_blocks))
        return start_q, finish(*(jnp.transpose(x, (0, 2, 1, 3)) for x in sums))

    block_shapes = jax.eval_shape(lambda: finish(*(jnp.zeros((1, 1, 1, n), jnp.float32) for n in (head_dim, 1, 1))))
    results = jax.tree.map(lambda s: jnp.zeros((batch, q_tokens, heads, s.shape[3]), s.dtype), block_shapes)
    # only half-precision queries are copied (as bits) for a loop; float32 ones are read in place
    per_chunk = -(-q_blocks // QUERY_CHUNKS) if _is_half(q.dtype) else q_blocks
    first_row = jnp.int32(0)  # traced: each loop hands over where the next one's queries start
    for first_block in range(0, q_blocks, per_chunk):
        last_block = min(first_block + per_chunk, q_blocks)
        rows = min(last_block * block_q, q_tokens) - min(first_block * block_q, q_tokens - block_q)
        q_rows = _to_bits(lax.dynamic_slice_in_dim(q, first_row, rows, 1))

        def write(i, carry, q_rows=q_rows, first_row=first_row):
            results, _ = carry
            start_q, block = query_block(q_rows, first_row, i)
            results = jax.tree.map(lambda r, b: lax.dynamic_update_slice_in_dim(r, b, start_q, 1), results, block)
            return results, jnp.minimum((i + 1) * block_q, q_tokens - block_q)

        results, first_row = lax.fori_loop(first_block, last_block, write, (results, first_row))
    return results


def _to_bits(x):
    """Half-precision arrays as their uint16 bits: XLA:CPU slices and updates bf16 arrays in float32
    and hoists the conversion of the whole array out of the block loops; bits keep it to one block."""
    return lax.bitcast_convert_type(x, jnp.uint16) if _is_half(x.dtype) else x


def _is_half(dtype) -> bool:
    return jnp.dtype(dtype).itemsize == 2 and jnp.issubdtype(dtype, jnp.floating)


def _from_bits(x, dtype):
    return lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def splash_attention(q, k, v, scale, save_residuals: bool = False, interpret: bool = False):
    """The Pallas TPU splash kernel on [B, N, H, D] inputs; with `save_residuals` also each query's
    float32 log-sum-exp [B, Nq, H, 1]. Sequences are padded to whole tiles (padded keys in their
    own segment, never attended), head dims zero-padded to the lane width (exact: zero features
    add nothing to scores, their zero outputs are cut off). `interpret` runs it on CPU (tests)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    q_tokens, k_tokens, heads, head_dim = q.shape[1], k.shape[1], q.shape[2], v.shape[3]
    tile = lambda n: SPLASH_BLOCK if n > SPLASH_BLOCK else SPLASH_LANES  # noqa: E731
    padded = lambda n, m: -(-n // m) * m  # noqa: E731
    q_pad, k_pad = padded(q_tokens, tile(q_tokens)), padded(k_tokens, tile(k_tokens))
    d_pad = padded(head_dim, SPLASH_LANES)

    def to_bhnd(x, tokens):
        x = jnp.pad(x, ((0, 0), (0, tokens - x.shape[1]), (0, 0), (0, d_pad - x.shape[3])))
        return jnp.transpose(x, (0, 2, 1, 3))

    sizes = splash.BlockSizes(block_q=min(q_pad, SPLASH_BLOCK), block_kv=min(k_pad, SPLASH_BLOCK))
    kernel = splash.make_splash_mha(splash.MultiHeadMask([splash.FullMask((q_pad, k_pad))] * heads),
                                    head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                    save_residuals=save_residuals, interpret=interpret)
    segments = splash.SegmentIds(q=jnp.zeros((q_pad,), jnp.int32),
                                 kv=(jnp.arange(k_pad) >= k_tokens).astype(jnp.int32))
    result = jax.vmap(kernel, in_axes=(0, 0, 0, None))(
        to_bhnd(_scaled(q, scale), q_pad), to_bhnd(k, k_pad), to_bhnd(v, k_pad), segments)
    out = result[0] if save_residuals else result
    out = jnp.transpose(out[:, :, :q_tokens, :head_dim], (0, 2, 1, 3)).astype(q.dtype)
    if not save_residuals:
        return out
    return out, jnp.transpose(result[1][0][:, :, :q_tokens], (0, 2, 1))[..., None]


def attention_partial(q, k, v, bias=None, scale=None) -> Partial:
    """Scores of q against a key set (float32), exponentiated against their max.

    `bias` is added to the scores, broadcastable to [B, H, Nq, Nk] (masks, relative positions);
    use a large finite negative rather than -inf for masked keys.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    implementation = _implementation(q, k, bias, partial=True)
    if implementation == "splash":  # normalized output with its float32 log-sum-exp: max = lse, denom = 1
        out, lse = splash_attention(q, k, v, scale, save_residuals=True)
        return Partial(out.astype(jnp.float32), lse, jnp.ones_like(lse))
    if implementation == "blockwise":
        return _blockwise(q, k, v, _bias4(bias), scale, Partial)
    return _one_block(q, k, v, bias, scale)


def identity_partial(q, k, v, scale=None) -> Partial:
    """The partial of each query over the one key at its own position (PAG's identity map on an
    image-over-image block, diffusers' PAG joint processors): q and k have the same tokens."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    own_score = jnp.einsum("bqhd,bqhd->bqh", q, k, preferred_element_type=jnp.float32)[..., None] * scale
    return Partial(v.astype(jnp.float32), own_score, jnp.ones_like(own_score))


def merge_partials(parts, dtype=None):
    """Softmax attention over the union of the parts' key sets (log-sum-exp merge)."""
    peak = parts[0].max
    for part in parts[1:]:
        peak = jnp.maximum(peak, part.max)
    out = sum(part.out * jnp.exp(part.max - peak) for part in parts)
    denom = sum(part.denom * jnp.exp(part.max - peak) for part in parts)
    return (out / denom).astype(dtype or parts[0].out.dtype)


def attention(q, k, v, bias=None, scale=None, softcap=None):
    """softmax(q k^T * scale + bias) v, computed in float32, returned in q's dtype. `softcap`
    (text encoders only, never guided) always takes the one-block path."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if softcap is not None:
        return merge_partials([_one_block(q, k, v, bias, scale, softcap)], dtype=q.dtype)
    implementation = _implementation(q, k, bias, partial=False)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    if implementation == "splash":
        return splash_attention(q, k, v, scale)
    if implementation == "blockwise":
        return _blockwise(q, k, v, _bias4(bias), scale, lambda out, peak, denom: (out / denom).astype(q.dtype))
    return merge_partials([_one_block(q, k, v, bias, scale)], dtype=q.dtype)


def merge_heads(x):
    """[B, N, H, D] -> [B, N, H*D]: the layout NAG normalizes over."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
