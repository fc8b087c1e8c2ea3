"""T5 (v1.1) encoder, as transformers' T5EncoderModel (the text encoder of Flux and SD3), and
UMT5 (transformers' UMT5EncoderModel, Wan's text encoder) as an option of the same module.

Differences from a textbook transformer, all from T5 itself: RMS LayerNorm without mean or
bias, no 1/sqrt(d) attention scaling (it is folded into the initialization), no biases in
any projection, and one learned relative-position bias (bucketed, bidirectional) computed by
block 0 and added to the scores of every block. The FFN is gated (v1.1): act(wi_0 x) * wi_1 x.
UMT5 differs only there: every block owns its relative-position table (`bias_per_layer`).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import SelfAttentionCore

MASKED = -1e9  # large finite negative for padded keys

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    activation: str = "gelu_new"
    gated: bool = True
    bias_per_layer: bool = False  # UMT5: each block has its own relative_attention_bias


    @classmethod
    def from_dict(cls, config: dict) -> "T5Config":
        """From transformers' config.json. `feed_forward_proj` is "gated-gelu" (v1.1, gelu_new)
        or a plain activation name (original T5: "relu"); model_type "umt5" is UMT5."""
        projection = config.get("feed_forward_proj", "gated-gelu")
        gated = projection.startswith("gated-")
        activation = projection.removeprefix("gated-")
        if activation == "gelu" and gated:
            activation = "gelu_new"  # transformers maps "gated-gelu" to the tanh approximation
        activation = config.get("dense_act_fn", activation)
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"T5 config: feed_forward_proj={projection!r} uses activation {activation!r}; "
                f"supported: {', '.join(ACTIVATIONS)}"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"activation", "gated", "bias_per_layer"}
        values = {k: v for k, v in config.items() if k in names}
        return cls(**values, activation=activation, gated=gated, bias_per_layer=config.get("model_type") == "umt5")


def relative_position_buckets(query_len: int, key_len: int, num_buckets: int, max_distance: int):
    """[query_len, key_len] bucket ids for key - query offsets (bidirectional, as T5 does):
    half the buckets per direction; within each, exact offsets below num_buckets/4, then
    logarithmically wider bins up to max_distance."""
    offset = jnp.arange(key_len)[None, :] - jnp.arange(query_len)[:, None]
    half = num_buckets // 2
    direction = (offset > 0).astype(jnp.int32) * half
    distance = jnp.abs(offset)
    exact = half // 2
    # max(distance, 1) only keeps log() finite where the exact branch is taken anyway.
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact) / math.log(max_distance / exact)
    far = jnp.minimum(exact + (log_ratio * (half - exact)).astype(jnp.int32), half - 1)
    return direction + jnp.where(distance < exact, distance, far)


class T5LayerNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, statistics in float32."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (weight.astype(self.dtype) * normed.astype(self.dtype)).astype(self.dtype)


def _clamp_half(x):
    """float16 overflows in T5's residual stream; clamp as transformers does (no-op otherwise)."""
    if x.dtype != jnp.float16:
        return x
    limit = jnp.finfo(jnp.float16).max - 1000
    return jnp.clip(x, -limit, limit)


class T5Block(nn.Module):
    config: T5Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, position_bias):
        cfg = self.config
        dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype,  # noqa: E731
                                                param_dtype=self.param_dtype, name=name)
        norm = lambda name: T5LayerNorm(cfg.layer_norm_epsilon, self.dtype, self.param_dtype, name=name)  # noqa: E731
        inner = cfg.num_heads * cfg.d_kv
        split = lambda t: t.reshape(*t.shape[:2], cfg.num_heads, cfg.d_kv)  # noqa: E731

        h = norm("layer.0.layer_norm")(x)
        q, k, v = (split(dense(inner, f"layer.0.SelfAttention.{n}")(h)) for n in "qkv")
        # T5 does not scale scores: the core gets q pre-multiplied by sqrt(d) to cancel its 1/sqrt(d).
        q = q * jnp.asarray(math.sqrt(cfg.d_kv), q.dtype)
        attended = SelfAttentionCore(name="layer.0.SelfAttention.core")(q, k, v, position_bias)
        x = _clamp_half(x + dense(cfg.d_model, "layer.0.SelfAttention.o")(attended))

        h = norm("layer.1.layer_norm")(x)
        act = ACTIVATIONS[cfg.activation]
        if cfg.gated:
            h = act(dense(cfg.d_ff, "layer.1.DenseReluDense.wi_0")(h)) * dense(cfg.d_ff, "layer.1.DenseReluDense.wi_1")(h)
        else:
            h = act(dense(cfg.d_ff, "layer.1.DenseReluDense.wi")(h))
        return _clamp_half(x + dense(cfg.d_model, "layer.1.DenseReluDense.wo")(h))


class T5Encoder(nn.Module):
    """input_ids [B, N] int (and optional attention_mask [B, N], 1 = real token) ->
    last hidden state [B, N, d_model] after the final LayerNorm."""

    config: T5Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @classmethod
    def from_config(cls, config: dict, dtype=jnp.float32, param_dtype=jnp.float32):
        return cls(T5Config.from_dict(config), dtype=dtype, param_dtype=param_dtype)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        cfg = self.config
        x = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype, param_dtype=self.param_dtype, name="shared")(input_ids)
        tokens = input_ids.shape[1]
        buckets = relative_position_buckets(tokens, tokens, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)
        mask_bias = 0.0 if attention_mask is None else jnp.where(attention_mask[:, None, None, :] > 0, 0.0, MASKED)

        def position_bias(block: int):
            table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, param_dtype=self.param_dtype,
                             name=f"encoder.block.{block}.layer.0.SelfAttention.relative_attention_bias")
            return jnp.transpose(table(buckets).astype(jnp.float32), (2, 0, 1))[None] + mask_bias  # [1|B, H, N, N]

        shared_bias = None if cfg.bias_per_layer else position_bias(0)  # T5: block 0's table serves every block
        for i in range(cfg.num_layers):
            bias = position_bias(i) if cfg.bias_per_layer else shared_bias
            x = T5Block(cfg, self.dtype, self.param_dtype, name=f"encoder.block.{i}")(x, bias)
        return T5LayerNorm(cfg.layer_norm_epsilon, self.dtype, self.param_dtype, name="encoder.final_layer_norm")(x)
