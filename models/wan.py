"""The Wan video transformer: diffusers' `WanTransformer3DModel` in linen (Wan2.1 T2V and I2V,
Wan2.2; TI2V-5B embeds one timestep per video token, `expand_timesteps`).

Reads top to bottom like the Wan paper's figure: cut the latent video [B, C, T, H, W] into
(1, 2, 2) patches (one token each, frames x rows x columns), embed the timestep into one
vector per row and a 6-way modulation, project the UMT5 text tokens (and, for I2V, the 257
CLIP image tokens), run the blocks under `scan_blocks` over parameters stacked on a leading
layer axis, then the final modulated norm, projection and un-patching.

A block: modulated LayerNorm -> self-attention (RMS QK-norm across heads, 3D RoPE split over
frames, height and width) -> gated residual; LayerNorm -> cross-attention to the text (I2V:
plus a separate attention to the image tokens through add_k_proj / add_v_proj, added before
the output projection) -> residual; modulated LayerNorm -> GELU MLP -> gated residual. The
per-block learned `scale_shift_table` is added to the shared time projection.

The text stream may carry more rows than the video (models/layers.py batch convention); the
CLIP image tokens are video-stream conditioning, one row per video row.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from models.layers import (
    CrossAttentionCore,
    GELUFeedForward,
    LayerStack,
    MLPEmbedder,
    RMSNorm,
    ScannedBlock,
    SelfAttentionCore,
    TextImageCrossAttentionCore,
    apply_rope,
    layer_norm,
    modulate,
    scan_blocks,
    timestep_embedding,
)

ROPE_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """diffusers' WanTransformer3DModel config.json fields (defaults: Wan2.1-T2V-14B)."""

    patch_size: tuple = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    @classmethod
    def from_dict(cls, config: dict) -> "WanConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        if "patch_size" in values:
            values["patch_size"] = tuple(values["patch_size"])
        values["out_channels"] = values.get("out_channels") or values.get("in_channels", cls.in_channels)
        made = cls(**values)
        if made.qk_norm != "rms_norm_across_heads":
            raise ValueError(f"Wan config: qk_norm={made.qk_norm!r} is not supported; allowed: 'rms_norm_across_heads'")
        if made.pos_embed_seq_len is not None:
            raise ValueError("Wan config: pos_embed_seq_len (first-last-frame models) is not supported; allowed: null")
        return made

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def rope_tables(head_dim: int, frames: int, height: int, width: int, theta: float = ROPE_THETA):
    """(cos, sin), each [frames * height * width, head_dim] float32: the head's features split
    into a frame part and equal height and width parts (each 2 * (head_dim // 6)), every
    (even, odd) pair rotated by its own axis position. Computed in float64 as diffusers does."""
    spatial = 2 * (head_dim // 6)
    angles = []
    for axis, (dim, size) in enumerate(zip((head_dim - 2 * spatial, spatial, spatial), (frames, height, width))):
        freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        axis_angles = np.arange(size, dtype=np.float64)[:, None] * freqs[None]
        shape = [1, 1, 1, dim // 2]
        shape[axis] = size
        angles.append(np.broadcast_to(axis_angles.reshape(shape), (frames, height, width, dim // 2)))
    angles = np.repeat(np.concatenate(angles, axis=-1).reshape(frames * height * width, -1), 2, axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class _Attention(nn.Module):
    """Projections of diffusers' WanAttention: to_q/to_k/to_v with RMS norm over all heads."""

    config: WanConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def dense(self, name, features=None):
        return nn.Dense(features or self.config.inner_dim, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def heads(self, x):
        return x.reshape(*x.shape[:-1], self.config.num_attention_heads, self.config.attention_head_dim)

    def norm(self, name):
        return RMSNorm(self.config.eps, param_dtype=self.param_dtype, name=name)


class WanSelfAttention(_Attention):
    @nn.compact
    def __call__(self, x, cos, sin):
        q = apply_rope(self.heads(self.norm("norm_q")(self.dense("to_q")(x))), cos, sin)
        k = apply_rope(self.heads(self.norm("norm_k")(self.dense("to_k")(x))), cos, sin)
        v = self.heads(self.dense("to_v")(x))
        return self.dense("to_out", x.shape[-1])(SelfAttentionCore(name="core")(q, k, v))


class WanCrossAttention(_Attention):
    """Video queries over the text tokens; with an image context (I2V) also over the image tokens."""

    @nn.compact
    def __call__(self, x, context, image_context=None):
        q = self.heads(self.norm("norm_q")(self.dense("to_q")(x)))
        k = self.heads(self.norm("norm_k")(self.dense("to_k")(context)))
        v = self.heads(self.dense("to_v")(context))
        if image_context is None:
            attended = CrossAttentionCore(name="core")(q, k, v)
        else:
            image_k = self.heads(self.norm("norm_added_k")(self.dense("add_k_proj")(image_context)))
            image_v = self.heads(self.dense("add_v_proj")(image_context))
            attended = TextImageCrossAttentionCore(name="core")(q, k, v, image_k, image_v)
        return self.dense("to_out", x.shape[-1])(attended)


class WanBlock(ScannedBlock):
    """One block, run by `scan_blocks` over the stacked parameters of all blocks."""

    config: WanConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, layer, context, image_context, time_projection, cos, sin):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        table = self.param("scale_shift_table", nn.initializers.normal(cfg.inner_dim**-0.5), (1, 6, cfg.inner_dim),
                           self.param_dtype)
        # time_projection [B, 1, 6, D] (one timestep per row) or [B, N, 6, D] (one per token)
        modulation = table.astype(jnp.float32)[:, None] + time_projection.astype(jnp.float32)
        shift, scale, gate, ff_shift, ff_scale, ff_gate = (modulation[:, :, i] for i in range(6))  # [B, 1 or N, D]

        h = modulate(layer_norm(x.astype(jnp.float32), cfg.eps), shift, scale).astype(x.dtype)
        attended = WanSelfAttention(cfg, name="attn1", **kw)(h, cos, sin)
        x = (x.astype(jnp.float32) + attended * gate).astype(x.dtype)

        h = x
        if cfg.cross_attn_norm:
            h = nn.LayerNorm(cfg.eps, dtype=jnp.float32, param_dtype=self.param_dtype, name="norm2")(x).astype(x.dtype)
        x = x + WanCrossAttention(cfg, name="attn2", **kw)(h, context, image_context)

        h = modulate(layer_norm(x.astype(jnp.float32), cfg.eps), ff_shift, ff_scale).astype(x.dtype)
        fed = GELUFeedForward(hidden=cfg.ffn_dim, name="ffn", **kw)(h)
        return (x.astype(jnp.float32) + fed.astype(jnp.float32) * ff_gate).astype(x.dtype), None


class WanImageEmbedding(nn.Module):
    """CLIP image tokens -> model width: LayerNorm, exact-GELU MLP, LayerNorm (all float32 norms)."""

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: nn.LayerNorm(1e-5, dtype=jnp.float32, param_dtype=self.param_dtype, name=name)  # noqa: E731
        h = norm("norm1")(x).astype(self.dtype)
        h = nn.Dense(x.shape[-1], name="ff_proj_in", **kw)(h)
        h = nn.Dense(self.features, name="ff_proj_out", **kw)(nn.gelu(h, approximate=False))
        return norm("norm2")(h).astype(self.dtype)


class WanTransformer3DModel(nn.Module):
    """hidden_states [B, C, T, H, W], timestep [B] (0..1000 flow timesteps) or [B, N] (one per
    video token, frames x rows x columns: Wan2.2 TI2V's conditioning frame at 0),
    encoder_hidden_states [Bt, L, text_dim], encoder_hidden_states_image [B, 257, image_dim]
    (I2V) -> the prediction [B, out_channels, T, H, W]."""

    config: WanConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @classmethod
    def from_config(cls, config: dict, dtype=jnp.float32, param_dtype=jnp.float32):
        return cls(WanConfig.from_dict(config), dtype=dtype, param_dtype=param_dtype)

    @property
    def layer_stacks(self) -> tuple[LayerStack, ...]:
        """The blocks' parameters, stacked under `blocks` (layer i unrolled: `blocks_i`)."""
        return (LayerStack("blocks", range(self.config.num_layers), "blocks"),)

    @nn.compact
    def __call__(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = cfg.inner_dim
        b, c, t, h, w = hidden_states.shape
        pt, ph, pw = cfg.patch_size
        f, gh, gw = t // pt, h // ph, w // pw
        # Conv3d with stride = kernel = patch: each patch (channels, pt, ph, pw) flattened is one token.
        patches = hidden_states.reshape(b, c, f, pt, gh, ph, gw, pw).transpose(0, 2, 4, 6, 1, 3, 5, 7)
        patches = patches.reshape(b, f * gh * gw, c * pt * ph * pw).astype(self.dtype)
        x = nn.Dense(dim, name="patch_embedding", **kw)(patches)
        cos, sin = rope_tables(cfg.attention_head_dim, f, gh, gw)

        # [B, 1] (per row) or [B, N] (per token) timesteps -> temb [B, 1 or N, D]
        timesteps = timestep if jnp.ndim(timestep) == 2 else jnp.broadcast_to(timestep, (b,))[:, None]
        frequencies = timestep_embedding(timesteps.reshape(-1), cfg.freq_dim, flip_sin_to_cos=True, freq_shift=0)
        temb = MLPEmbedder(dim, dtype=jnp.float32, param_dtype=self.param_dtype, name="time_embedder")(frequencies)
        temb = temb.astype(self.dtype).reshape(b, -1, dim)
        time_projection = nn.Dense(6 * dim, name="time_proj", **kw)(nn.silu(temb)).reshape(b, -1, 6, dim)
        context = nn.Dense(dim, name="text_embedder_linear_1", **kw)(encoder_hidden_states.astype(self.dtype))
        context = nn.Dense(dim, name="text_embedder_linear_2", **kw)(nn.gelu(context, approximate=True))
        image_context = None
        if cfg.image_dim is not None:
            if encoder_hidden_states_image is None:
                raise ValueError("encoder_hidden_states_image is required: this Wan transformer is image-to-video")
            image_context = encoder_hidden_states_image.astype(self.dtype)
            image_context = WanImageEmbedding(dim, name="image_embedder", **kw)(image_context)

        x = scan_blocks(WanBlock, self.layer_stacks[0], x, context, image_context, time_projection, cos, sin,
                        config=cfg, **kw)

        table = self.param("scale_shift_table", nn.initializers.normal(dim**-0.5), (1, 2, dim), self.param_dtype)
        modulation = table.astype(jnp.float32)[:, None] + temb.astype(jnp.float32)[:, :, None]  # [B, 1 or N, 2, D]
        shift, scale = modulation[:, :, 0], modulation[:, :, 1]
        x = modulate(layer_norm(x.astype(jnp.float32), cfg.eps), shift, scale).astype(x.dtype)
        x = nn.Dense(cfg.out_channels * math.prod(cfg.patch_size), name="proj_out", **kw)(x)
        x = x.reshape(b, f, gh, gw, pt, ph, pw, cfg.out_channels).transpose(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, cfg.out_channels, t, h, w)
