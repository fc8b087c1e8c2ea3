"""Building blocks the model families share.

The attention cores are parameterless modules around `nag_jax.attention.attention`. Models
compute projections, norms and rotary embeddings themselves and call a core with per-head
q/k/v; the core returns heads merged ([B, N, H*D]), before the output projection. A core is
the one place guidance reaches a model: `nag_jax.guided` intercepts these module types and
nothing else, so the models stay guidance-unaware.

Batch convention: a context (text) stream may carry more rows than the image stream. Extra
context rows belong to the *last* image rows, in order (image row B - n + i for extra row i).
Outside guidance there must be none.
"""

from __future__ import annotations

import contextlib
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nag_jax.attention import attention, merge_heads


def _require_same_batch(image_rows: int, context_rows: int, what: str) -> None:
    if image_rows != context_rows:
        raise ValueError(
            f"{what}: the context has {context_rows} rows for {image_rows} image rows; extra "
            "(negative) context rows are only meaningful inside nag_jax.guided(...)"
        )


class SelfAttentionCore(nn.Module):
    """Attention of a stream over itself (UNet attn1, text encoders; Gemma-2 with its own scale
    and logit soft-capping)."""

    @nn.compact
    def __call__(self, q, k, v, bias=None, scale=None, softcap=None):
        return merge_heads(attention(q, k, v, bias, scale, softcap))


class CrossAttentionCore(nn.Module):
    """Image queries over context keys/values (UNet attn2, PixArt, SANA, Wan). `bias`: None or
    one additive row per context row, [B, 1, 1, Nk] (the text mask of PixArt and SANA)."""

    @nn.compact
    def __call__(self, q, k, v, bias=None):
        _require_same_batch(q.shape[0], k.shape[0], "cross-attention")
        return merge_heads(attention(q, k, v, bias))


MASKED = -1e9  # score bias of a masked key: finite, so a fully masked block still merges to weight 0


def key_mask_bias(mask):
    """A key mask [B, Nk] (true or 1: attend) -> score bias [B, 1, 1, Nk] for `attention`."""
    return jnp.where(mask.astype(bool), 0.0, MASKED)[:, None, None, :]


class TextImageCrossAttentionCore(nn.Module):
    """Video queries over text keys/values plus, separately, over image keys/values, the two
    results summed (Wan I2V's attn2: the image tokens go through add_k_proj/add_v_proj). The
    image keys belong to the image stream: one row per query row."""

    @nn.compact
    def __call__(self, q, k, v, image_k, image_v):
        _require_same_batch(q.shape[0], k.shape[0], "cross-attention")
        return merge_heads(attention(q, k, v)) + merge_heads(attention(q, image_k, image_v))


class JointAttentionCore(nn.Module):
    """MM-DiT attention: text and image tokens attend over [text; image] (Flux, SD3, Chroma).

    `txt_mask` [B, T] (Chroma's text padding mask) hides masked text tokens as keys from every
    query; image tokens are never masked. Returns (text_out, image_out), each with heads merged.
    """

    @nn.compact
    def __call__(self, txt_q, txt_k, txt_v, img_q, img_k, img_v, txt_mask=None):
        _require_same_batch(img_q.shape[0], txt_q.shape[0], "joint attention")
        joined = [jnp.concatenate([t, i], axis=1) for t, i in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v))]
        bias = None
        if txt_mask is not None:
            bias = key_mask_bias(jnp.concatenate([txt_mask, jnp.ones(img_k.shape[:2], txt_mask.dtype)], axis=1))
        out = merge_heads(attention(*joined, bias))
        text_tokens = txt_q.shape[1]
        return out[:, :text_tokens], out[:, text_tokens:]


# --- repeated blocks under scan (Flux, SD3 and every later DiT family) ---


class ScannedBlock(nn.Module):
    """Base of a block that `scan_blocks` runs over parameters stacked along a leading layer axis.

    Its `__call__(carry, layer, *broadcast)` returns `(carry, None)`, or with `scan_blocks`'
    `per_layer` inputs `__call__(carry, layer, layer_inputs, *broadcast)` (this layer's slice);
    blocks may also return per-layer outputs in place of None. `layer` is the traced global
    index of the layer (int32 scalar). `layers` and `layer_name` are set by `scan_blocks`, static:
    layer `i` stands for the module `{layer_name}_{i}` of an unrolled model (a sibling of the
    stack), which is how guidance names a layer (PAG's `pag_applied_layers`) and how converters
    name per-layer weights before stacking them.
    """

    layers: tuple[int, ...] = dataclasses.field(default=(), kw_only=True)
    layer_name: str = dataclasses.field(default="", kw_only=True)


@dataclasses.dataclass(frozen=True)
class LayerStack:
    """Where a run of layers lives: parameters under `path` ('/'-joined) stacked along axis 0 in
    the order of `layers` (global indices); layer i, unrolled, is the sibling `{layer_name}_{i}`."""

    path: str
    layers: range
    layer_name: str

    def layer_path(self, index: int) -> str:
        """The unrolled module path of global layer `index`."""
        parent = self.path.rpartition("/")[0]
        return f"{parent}/{self.layer_name}_{index}" if parent else f"{self.layer_name}_{index}"


_UNROLL = [False]


@contextlib.contextmanager
def unrolled_layers():
    """While tracing inside this context, `scan_blocks` unrolls its loop (same parameters, same
    numbers): XLA's cost analysis counts a loop body once, so FLOP counts need it unrolled."""
    _UNROLL.append(True)
    try:
        yield
    finally:
        _UNROLL.pop()


def scan_blocks(block: type[ScannedBlock], stack: LayerStack, carry, *broadcast, per_layer=None, outputs=False,
                **fields):
    """Run `block(**fields)` over `stack.layers` in one `nn.scan`: `carry` threads through the
    layers, `broadcast` arguments reach every layer unchanged, `per_layer` (a pytree with a
    leading layer axis) gives each layer its own slice, parameters are stacked under the module
    named by `stack.path`'s last part (create it inside the parent's compact method). Returns the
    carry, or `(carry, outputs stacked along a leading layer axis)` with `outputs`. The compiled
    program holds one copy of the block, whatever the depth. No layers: `carry`."""
    if not stack.layers:
        return carry
    scanned_inputs = (0,) if per_layer is None else (0, 0)
    scanned = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=scanned_inputs + (nn.broadcast,) * len(broadcast),
        length=len(stack.layers),
        unroll=len(stack.layers) if _UNROLL[-1] else 1,
    )
    module = scanned(**fields, layers=tuple(stack.layers), layer_name=stack.layer_name,
                     name=stack.path.rpartition("/")[2])
    layer_inputs = () if per_layer is None else (per_layer,)
    carry, ys = module(carry, np.asarray(stack.layers, np.int32), *layer_inputs, *broadcast)
    return (carry, ys) if outputs else carry


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool = False, freq_shift: float = 1.0,
                       scale: float = 1.0, max_period: float = 10000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps [B] -> [B, dim], float32.

    Frequencies exp(-log(max_period) * i / (dim/2 - freq_shift)); the halves are [sin, cos]
    or, with flip_sin_to_cos, [cos, sin] (the diffusers parameters of the same names).
    """
    half = dim // 2
    exponent = -jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = scale * timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def rms_normalized(x, eps: float):
    """x / sqrt(mean(x^2) + eps) over the last axis, in float32."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """x / rms(x) * scale over the last axis, computed in float32 (QK-norm of Flux and SD3.5)."""

    eps: float = 1e-6
    use_scale: bool = True
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        normed = rms_normalized(x, self.eps)
        if self.use_scale:
            normed = normed * self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return normed.astype(x.dtype)


# --- adaLN-modulated transformer pieces (Flux, SD3) ---


def layer_norm(x, eps: float = 1e-6):
    """LayerNorm over the last axis without affine parameters, computed in float32 (adaLN's norm)."""
    x32 = x.astype(jnp.float32)
    centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    normed = centered * jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype)


def modulate(x, shift, scale):
    """adaLN: x [B, N, D] * (1 + scale) + shift, with one shift/scale row [B, D] per batch row
    or one per token [B, N, D] (Wan2.2 TI2V's per-token timesteps)."""
    if scale.ndim == 2:
        shift, scale = shift[:, None, :], scale[:, None, :]
    return x * (1 + scale) + shift


class AdaLNModulation(nn.Module):
    """SiLU -> Linear -> `chunks` per-row vectors of size `dim` (diffusers' `AdaLayerNormZero.linear`,
    `AdaLayerNormZeroSingle.linear`, `AdaLayerNormContinuous.linear`), in the checkpoint's order."""

    dim: int
    chunks: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, emb):
        out = nn.Dense(self.chunks * self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear")(nn.silu(emb))
        return jnp.split(out, self.chunks, axis=-1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (diffusers' `TimestepEmbedding` and `PixArtAlphaTextProjection`
    with act 'silu'; BFL's `MLPEmbedder`)."""

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda name: nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        return dense("linear_2")(nn.silu(dense("linear_1")(x)))


class GELUFeedForward(nn.Module):
    """Linear(dim -> mult*dim, or `hidden`) -> tanh-approximated GELU -> Linear(-> dim)
    (diffusers' `FeedForward(activation_fn="gelu-approximate")`: net.0.proj and net.2)."""

    mult: int = 4
    hidden: int | None = None  # inner width when it is not a multiple of dim (Wan's ffn_dim)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        hidden = nn.Dense(self.hidden or self.mult * dim, dtype=self.dtype, param_dtype=self.param_dtype, name="proj_in")(x)
        return nn.Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype, name="proj_out")(
            nn.gelu(hidden, approximate=True)
        )


class QKVProjection(nn.Module):
    """q, k, v of one stream split into heads [B, N, H, D], with optional RMS QK-norm
    (diffusers' to_q/to_k/to_v and norm_q/norm_k of MM-DiT attention: Flux, SD3.5)."""

    heads: int
    head_dim: int
    qk_norm: bool = True
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        def project(name):
            y = nn.Dense(self.heads * self.head_dim, dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)
            return y.reshape(*y.shape[:-1], self.heads, self.head_dim)

        q, k, v = project("q"), project("k"), project("v")
        if self.qk_norm:
            q = RMSNorm(self.eps, param_dtype=self.param_dtype, name="norm_q")(q)
            k = RMSNorm(self.eps, param_dtype=self.param_dtype, name="norm_k")(k)
        return q, k, v


# --- rotary position embedding over several id axes (Flux) ---


def rope_cos_sin(ids, axes_dims, theta: float = 10000.0):
    """Rotary angles for integer position ids [S, n_axes] -> (cos, sin), each [S, sum(axes_dims)] float32.

    Axis i uses frequencies theta^(-2j/d_i), j < d_i/2; each angle is repeated for the two
    members of its (even, odd) feature pair, the layout `apply_rope` expects.
    """
    angles = []
    for axis, dim in enumerate(axes_dims):
        freqs = theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
        angles.append(ids[:, axis].astype(jnp.float32)[:, None] * freqs[None, :])
    angles = jnp.repeat(jnp.concatenate(angles, axis=-1), 2, axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate each (even, odd) feature pair of x [B, S, H, D] by the angles of its token, in float32."""
    x32 = x.astype(jnp.float32)
    pairs = x32.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)
