"""CLIP text and vision towers (transformers' CLIPTextModel[WithProjection], CLIPVisionModel[WithProjection]).

Token + position embeddings, pre-LayerNorm transformer layers with a causal mask, a final
LayerNorm, the pooled state at the end-of-text token and, optionally, a bias-free text
projection of it. Every layer's output is returned (un-normalized), so pipelines pick what
they need: SDXL reads the penultimate layer `hidden_states[-2]`, SD1.5 with `clip_skip=k`
reads `hidden_states[-(k + 1)]` and applies `final_layer_norm` itself (`CLIPTextEncoder.
final_norm`). Unused layers cost nothing under jit: XLA drops them.

The vision tower shares the encoder layer: a patch-embedding convolution, a class token and
learned positions, a LayerNorm before the layers (`pre_layrnorm`, transformers' spelling), a
LayerNorm on the class token after them, and optionally the bias-free visual projection.
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
        return cls(**_tower_values(cls, config, "text_config", projection))


def _tower_values(cls, config: dict, sub_config: str, projection: bool | None) -> dict:
    """The fields of `cls` from a tower's config.json, or from a full CLIPConfig's `sub_config`
    (whose projection_dim lives at the top level)."""
    tower = config.get(sub_config, config)
    if projection is None:
        projection = any("WithProjection" in name for name in tower.get("architectures") or ())
    if tower.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
        raise ValueError(
            f"CLIP config: hidden_act={tower['hidden_act']!r} is not supported; use one of {', '.join(ACTIVATIONS)}"
        )
    names = {f.name for f in dataclasses.fields(cls)} - {"projection_dim"}
    values = {k: v for k, v in tower.items() if k in names}
    projection_dim = config.get("projection_dim", tower.get("projection_dim", 512))
    return {**values, "projection_dim": projection_dim if projection else None}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # set: CLIPVisionModelWithProjection (visual_projection)

    @classmethod
    def from_dict(cls, config: dict, projection: bool | None = None) -> "CLIPVisionConfig":
        """From transformers' config.json (a CLIPVisionConfig, or a CLIPConfig's `vision_config`).

        `projection` defaults to whether the architecture is ...WithProjection.
        """
        return cls(**_tower_values(cls, config, "vision_config", projection))


@flax.struct.dataclass
class CLIPTextOutput:
    last_hidden_state: jax.Array  # [B, N, D], after final_layer_norm
    pooled: jax.Array  # [B, D], last_hidden_state at the end-of-text token
    hidden_states: tuple  # num_hidden_layers + 1 arrays [B, N, D]: embeddings, then each layer's output
    text_embeds: jax.Array | None = None  # [B, projection_dim], text_projection(pooled), with projection only


@flax.struct.dataclass
class CLIPVisionOutput:
    last_hidden_state: jax.Array  # [B, 1 + patches, D], the last layer's output (no final norm)
    pooled: jax.Array  # [B, D], post_layernorm of the class token
    hidden_states: tuple  # num_hidden_layers + 1 arrays: pre_layrnorm(embeddings), then each layer's output
    image_embeds: jax.Array | None = None  # [B, projection_dim], visual_projection(pooled), with projection only


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm self-attention + MLP layer of both towers (the text tower passes a causal bias)."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias=None):
        cfg = self.config
        dense = lambda features, name: nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                         use_fast_variance=False, name=name)
        heads = cfg.num_attention_heads
        split = lambda t: t.reshape(*t.shape[:2], heads, -1)  # noqa: E731

        h = norm("layer_norm1")(x)
        q, k, v = (split(dense(cfg.hidden_size, f"self_attn.{n}")(h)) for n in ("q_proj", "k_proj", "v_proj"))
        attended = SelfAttentionCore(name="self_attn.core")(q, k, v, bias)
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


class CLIPVisionModel(nn.Module):
    """pixel_values [B, C, H, W] (NCHW, normalised as CLIP's image processor does) -> CLIPVisionOutput.

    Wan I2V reads the penultimate layer `hidden_states[-2]`; CLIP score reads `image_embeds`.
    """

    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @classmethod
    def from_config(cls, config: dict, dtype=jnp.float32, param_dtype=jnp.float32, projection: bool | None = None):
        return cls(CLIPVisionConfig.from_dict(config, projection), dtype=dtype, param_dtype=param_dtype)

    @nn.compact
    def __call__(self, pixel_values) -> CLIPVisionOutput:
        cfg = self.config
        size, patch = cfg.image_size, cfg.patch_size
        if pixel_values.shape[1:] != (cfg.num_channels, size, size):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; this CLIP vision tower takes "
                f"[B, {cfg.num_channels}, {size}, {size}]"
            )
        norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                         use_fast_variance=False, name=name)
        x = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)
        patches = nn.Conv(cfg.hidden_size, (patch, patch), strides=(patch, patch), padding="VALID", use_bias=False,
                          dtype=self.dtype, param_dtype=self.param_dtype, name="embeddings.patch_embedding")(x)
        patches = patches.reshape(patches.shape[0], -1, cfg.hidden_size)  # row-major grid, as torch's flatten(2)
        class_token = self.param("embeddings.class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,),
                                 self.param_dtype).astype(self.dtype)
        x = jnp.concatenate([jnp.broadcast_to(class_token, (x.shape[0], 1, cfg.hidden_size)), patches], axis=1)
        positions = nn.Embed(x.shape[1], cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="embeddings.position_embedding")(jnp.arange(x.shape[1]))
        x = norm("pre_layrnorm")(x + positions[None])
        hidden_states = [x]
        for i in range(cfg.num_hidden_layers):
            x = CLIPEncoderLayer(cfg, self.dtype, self.param_dtype, name=f"encoder.layers.{i}")(x)
            hidden_states.append(x)
        pooled = norm("post_layernorm")(x[:, 0])
        image_embeds = None
        if cfg.projection_dim is not None:
            image_embeds = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                                    name="visual_projection")(pooled)
        return CLIPVisionOutput(x, pooled, tuple(hidden_states), image_embeds)
