"""CLIP text encoder (transformers' CLIPTextModel / CLIPTextModelWithProjection).

Token + position embeddings, pre-LayerNorm transformer layers with a causal mask, a final
LayerNorm, the pooled state at the end-of-text token and, optionally, a bias-free text
projection of it. Every layer's output is returned (un-normalized), so pipelines pick what
they need: SDXL reads the penultimate layer `hidden_states[-2]`, SD1.5 with `clip_skip=k`
reads `hidden_states[-(k + 1)]` and applies `final_layer_norm` itself (`CLIPTextEncoder.
final_norm`). Unused layers cost nothing under jit: XLA drops them.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from models.layers import SelfAttentionCore

# Masked scores: large and finite, so a fully masked row never turns into NaN.
MASKED = -1e9

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2
    projection_dim: int | None = None  # set: CLIPTextModelWithProjection (text_projection)

    @classmethod
    def from_dict(cls, config: dict, projection: bool | None = None) -> "CLIPTextConfig":
        """From transformers' config.json (a CLIPTextConfig, or a CLIPConfig's `text_config`).

        `projection` defaults to whether the architecture is ...WithProjection.
        """
        config = config.get("text_config", config)
        if projection is None:
            projection = any("WithProjection" in name for name in config.get("architectures") or ())
        if config.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
            raise ValueError(
                f"CLIP config: hidden_act={config['hidden_act']!r} is not supported; use one of {', '.join(ACTIVATIONS)}"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"projection_dim"}
        values = {k: v for k, v in config.items() if k in names}
        return cls(**values, projection_dim=config.get("projection_dim", 512) if projection else None)


@flax.struct.dataclass
class CLIPTextOutput:
    last_hidden_state: jax.Array  # [B, N, D], after final_layer_norm
    pooled: jax.Array  # [B, D], last_hidden_state at the end-of-text token
    hidden_states: tuple  # num_hidden_layers + 1 arrays [B, N, D]: embeddings, then each layer's output
    text_embeds: jax.Array | None = None  # [B, projection_dim], text_projection(pooled), with projection only


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, causal_bias):
        cfg = self.config
        dense = lambda features, name: nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                         use_fast_variance=False, name=name)
        heads = cfg.num_attention_heads
        split = lambda t: t.reshape(*t.shape[:2], heads, -1)  # noqa: E731

        h = norm("layer_norm1")(x)
        q, k, v = (split(dense(cfg.hidden_size, f"self_attn.{n}")(h)) for n in ("q_proj", "k_proj", "v_proj"))
        attended = SelfAttentionCore(name="self_attn.core")(q, k, v, causal_bias)
        x = x + dense(cfg.hidden_size, "self_attn.out_proj")(attended)

        h = norm("layer_norm2")(x)
        h = dense(cfg.hidden_size, "mlp.fc2")(ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, "mlp.fc1")(h)))
        return x + h


class CLIPTextEncoder(nn.Module):
    """input_ids [B, N] int -> CLIPTextOutput (see the module docstring for hidden_states)."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @classmethod
    def from_config(cls, config: dict, dtype=jnp.float32, param_dtype=jnp.float32, projection: bool | None = None):
        return cls(CLIPTextConfig.from_dict(config, projection), dtype=dtype, param_dtype=param_dtype)

    def setup(self):
        cfg = self.config
        embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        self.token_embedding = embed(cfg.vocab_size, "embeddings.token_embedding")
        self.position_embedding = embed(cfg.max_position_embeddings, "embeddings.position_embedding")
        self.layers = [
            CLIPEncoderLayer(cfg, self.dtype, self.param_dtype, name=f"encoder.layers.{i}")
            for i in range(cfg.num_hidden_layers)
        ]
        self.final_layer_norm = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                                             use_fast_variance=False, name="final_layer_norm")
        if cfg.projection_dim is not None:
            self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name="text_projection")

    def final_norm(self, hidden):
        """The final LayerNorm alone (SD1.5's clip_skip applies it to an earlier layer)."""
        return self.final_layer_norm(hidden)

    def __call__(self, input_ids) -> CLIPTextOutput:
        cfg = self.config
        tokens = input_ids.shape[1]
        if tokens > cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids has {tokens} tokens; this CLIP encoder takes at most {cfg.max_position_embeddings}"
            )
        x = self.token_embedding(input_ids) + self.position_embedding(jnp.arange(tokens))[None]
        causal = jnp.tril(jnp.ones((tokens, tokens), dtype=bool))
        causal_bias = jnp.where(causal, 0.0, MASKED).astype(jnp.float32)[None, None]
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x, causal_bias)
            hidden_states.append(x)
        last = self.final_layer_norm(x)

        if cfg.eos_token_id == 2:
            # Legacy configs (eos_token_id was wrong before transformers PR 24773): the end-of-text
            # token has the largest id in the vocabulary, so take the argmax position.
            eos_position = jnp.argmax(input_ids, axis=-1)
        else:
            # First occurrence of the eos id (the pad token may equal it).
            eos_position = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos_position[:, None, None], axis=1)[:, 0]
        text_embeds = self.text_projection(pooled) if cfg.projection_dim is not None else None
        return CLIPTextOutput(last, pooled, tuple(hidden_states), text_embeds)
