"""Gemma-2 decoder as a text encoder, as transformers' `Gemma2Model` (SANA's text encoder).

Gemma-2 specifics: token embeddings scaled by sqrt(hidden_size); RMSNorm weights stored as
offsets (x * (1 + w)); grouped-query attention (num_key_value_heads < num_attention_heads)
with rotary embeddings on half-split features, scores scaled by query_pre_attn_scalar^-0.5
and soft-capped (cap * tanh(s / cap)); causal attention, alternately over a sliding window
and globally (`layer_types`); norms after attention and after the MLP as well as before;
a gated tanh-GELU MLP. Returns the last hidden state after the final norm.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.layers import MASKED, SelfAttentionCore, rms_normalized


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    attn_logit_softcapping: float | None = 50.0
    sliding_window: int = 4096
    layer_types: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, config: dict) -> "Gemma2Config":
        activation = config.get("hidden_activation", "gelu_pytorch_tanh")
        if activation != "gelu_pytorch_tanh":
            raise ValueError(f"Gemma-2 config: hidden_activation must be 'gelu_pytorch_tanh', got {activation!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        rope = config.get("rope_parameters") or {}
        if "rope_theta" in rope:  # transformers 5 keeps it here
            values["rope_theta"] = rope["rope_theta"]
        if values.get("layer_types") is not None:
            values["layer_types"] = tuple(values["layer_types"])
        return cls(**values)

    def is_sliding(self, layer: int) -> bool:
        """transformers' default alternates: even layers slide, odd layers see everything."""
        if self.layer_types is not None:
            return self.layer_types[layer] == "sliding_attention"
        return layer % 2 == 0


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), in float32, cast back to x's dtype."""

    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        return (rms_normalized(x, self.eps) * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def rotate_half_rope(x, cos, sin):
    """Rotary embedding on [B, N, H, D] with the two halves of D as (real, imaginary) parts."""
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * cos[None, :, None] + rotated * sin[None, :, None]).astype(x.dtype)


class Gemma2Layer(nn.Module):
    config: Gemma2Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias, cos, sin):
        cfg = self.config
        dense = lambda features, name, bias=cfg.attention_bias: nn.Dense(  # noqa: E731
            features, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        norm = lambda name: GemmaRMSNorm(cfg.rms_norm_eps, self.param_dtype, name=name)  # noqa: E731
        heads = lambda t: t.reshape(*t.shape[:2], -1, cfg.head_dim)  # noqa: E731

        h = norm("input_layernorm")(x)
        q = rotate_half_rope(heads(dense(cfg.num_attention_heads * cfg.head_dim, "self_attn.q_proj")(h)), cos, sin)
        k = rotate_half_rope(heads(dense(cfg.num_key_value_heads * cfg.head_dim, "self_attn.k_proj")(h)), cos, sin)
        v = heads(dense(cfg.num_key_value_heads * cfg.head_dim, "self_attn.v_proj")(h))
        groups = cfg.num_attention_heads // cfg.num_key_value_heads  # each kv head serves `groups` query heads
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        attended = SelfAttentionCore(name="self_attn.core")(q, k, v, bias, cfg.query_pre_attn_scalar**-0.5,
                                                            cfg.attn_logit_softcapping)
        x = x + norm("post_attention_layernorm")(dense(cfg.hidden_size, "self_attn.o_proj")(attended))

        h = norm("pre_feedforward_layernorm")(x)
        gate = jax.nn.gelu(dense(cfg.intermediate_size, "mlp.gate_proj", False)(h), approximate=True)
        h = dense(cfg.hidden_size, "mlp.down_proj", False)(gate * dense(cfg.intermediate_size, "mlp.up_proj", False)(h))
        return x + norm("post_feedforward_layernorm")(h)


class Gemma2Encoder(nn.Module):
    """input_ids [B, N] int, attention_mask [B, N] (1 = token) -> last hidden state [B, N, hidden]."""

    config: Gemma2Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @classmethod
    def from_config(cls, config: dict, dtype=jnp.float32, param_dtype=jnp.float32):
        return cls(Gemma2Config.from_dict(config), dtype=dtype, param_dtype=param_dtype)

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        cfg = self.config
        x = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="embed_tokens")(input_ids)
        x = x * jnp.asarray(cfg.hidden_size**0.5, self.param_dtype).astype(x.dtype)
        tokens = input_ids.shape[1]
        inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim)
        angles = jnp.arange(tokens, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
        angles = jnp.concatenate([angles, angles], axis=-1)
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        query, key = np.arange(tokens)[:, None], np.arange(tokens)[None, :]
        padding = attention_mask[:, None, None, :] > 0
        visible = {sliding: padding & jnp.asarray((key <= query) & (~sliding | (query - key < cfg.sliding_window)))
                   for sliding in (False, True)}
        biases = {sliding: jnp.where(seen, 0.0, MASKED) for sliding, seen in visible.items()}
        for i in range(cfg.num_hidden_layers):
            layer = Gemma2Layer(cfg, self.dtype, self.param_dtype, name=f"layers.{i}")
            x = layer(x, biases[cfg.is_sliding(i)], cos, sin)
        return GemmaRMSNorm(cfg.rms_norm_eps, self.param_dtype, name="norm")(x)
