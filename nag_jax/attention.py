"""The one attention function every model uses, built from mergeable partial results.

`attention_partial` computes softmax attention over one block of keys without normalizing,
keeping the running max and denominator; `merge_partials` combines blocks by a log-sum-exp
merge. Attention over concatenated key blocks equals the merge of the blocks' partials, which
lets NAG compute image-key scores once and share them between the positive and negative
branches (nag-semantics.md section 2). Plain `attention` is the one-block case.

Layout: q [B, Nq, H, D], k and v [B, Nk, H, D]; results [B, Nq, H, D].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Partial(NamedTuple):
    """Unnormalized attention over one key block: out / denom is that block's softmax result."""

    out: jax.Array  # [B, Nq, H, D] float32, sum_k exp(s - max) v
    max: jax.Array  # [B, Nq, H, 1] float32, max_k s
    denom: jax.Array  # [B, Nq, H, 1] float32, sum_k exp(s - max)

    def rows(self, index) -> "Partial":
        """The same partial for a subset of batch rows."""
        return Partial(*(x[index] for x in self))


def attention_partial(q, k, v, bias=None, scale=None, softcap=None) -> Partial:
    """Scores of q against one key block (float32), exponentiated against their max.

    `bias` is added to the scores, broadcastable to [B, H, Nq, Nk] (masks, relative positions);
    use a large finite negative rather than -inf for masked keys. `softcap`: scores become
    softcap * tanh(scores / softcap) before the bias (Gemma-2's attention-logit soft-capping).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - peak)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    to_bqh1 = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # noqa: E731 [B,H,Nq,1] -> [B,Nq,H,1]
    return Partial(out, to_bqh1(peak), to_bqh1(denom))


def identity_partial(q, k, v, scale=None) -> Partial:
    """The partial of each query over the one key at its own position (PAG's identity map on an
    image-over-image block, diffusers' PAG joint processors): q and k have the same tokens."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    own_score = jnp.einsum("bqhd,bqhd->bqh", q, k, preferred_element_type=jnp.float32)[..., None] * scale
    return Partial(v.astype(jnp.float32), own_score, jnp.ones_like(own_score))


def merge_partials(parts, dtype=None):
    """Softmax attention over the union of the parts' key blocks (log-sum-exp merge)."""
    peak = parts[0].max
    for part in parts[1:]:
        peak = jnp.maximum(peak, part.max)
    out = sum(part.out * jnp.exp(part.max - peak) for part in parts)
    denom = sum(part.denom * jnp.exp(part.max - peak) for part in parts)
    return (out / denom).astype(dtype or parts[0].out.dtype)


def attention(q, k, v, bias=None, scale=None, softcap=None):
    """softmax(q k^T * scale + bias) v, computed in float32, returned in q's dtype."""
    return merge_partials([attention_partial(q, k, v, bias, scale, softcap)], dtype=q.dtype)


def merge_heads(x):
    """[B, N, H, D] -> [B, N, H*D]: the layout NAG normalizes over."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
