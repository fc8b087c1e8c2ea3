"""SANA / SANA-Sprint transformer, as diffusers' `SanaTransformer2DModel`.

PixArt's skeleton (patch embedding, adaLN-single with per-block scale/shift tables, final
modulated norm; models/pixart.py) with SANA's pieces: linear self-attention with a ReLU
kernel (computed in float32, as diffusers' `SanaLinearAttnProcessor2_0`), softmax
cross-attention over the RMS-normed caption projection (masked, through `CrossAttentionCore`;
its keys and values projected once per sampling run: `TwoPartTransformer`),
the GLU-MBConv feed-forward (1x1 conv, depthwise 3x3, SiLU-gated, 1x1 conv) on the token grid.
SANA-Sprint adds the guidance embedding and RMS QK-norm across heads. Blocks run under `scan_blocks`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from models.layers import (MLPEmbedder, RMSNorm, ScannedBlock, layer_norm, modulate, rms_normalized, scan_blocks,
                           timestep_embedding)
from models.pixart import (AdaLNSingle, CaptionProjection, CrossAttention, DiTConfig, DiTPart, SelfAttention,
                           TwoPartTransformer, block_modulation, blocks_stack, final_layer, patchify, sincos_2d,
                           text_keys_values)


class BiasedRMSNorm(nn.Module):
    """diffusers' `RMSNorm(elementwise_affine=True, bias=True)` over the last axis: x / rms(x) * weight + bias."""

    eps: float = 1e-5
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        return (rms_normalized(x, self.eps) * weight + bias).astype(x.dtype)


class GLUMBConv(nn.Module):
    """diffusers' `GLUMBConv` on a channels-last grid [B, H, W, C]: pointwise conv to 2*hidden,
    SiLU, depthwise 3x3, split into (x, gate), x * SiLU(gate), pointwise conv back (no bias);
    DC-AE's variant (`norm_residual`) adds an RMS norm with bias and the residual."""

    mlp_ratio: float
    norm_residual: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        hidden = int(self.mlp_ratio * dim)
        h = nn.silu(nn.Dense(2 * hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="conv_inverted")(x))
        h = nn.Conv(2 * hidden, (3, 3), padding=1, feature_group_count=2 * hidden, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="conv_depth")(h)
        h = h[..., :hidden] * nn.silu(h[..., hidden:])
        h = nn.Dense(dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="conv_point")(h)
        if not self.norm_residual:
            return h
        return x + BiasedRMSNorm(param_dtype=self.param_dtype, name="norm")(h)


class SanaBlock(ScannedBlock):
    """diffusers' `SanaTransformerBlock`, as a scan body over the image tokens."""

    heads: int
    head_dim: int
    cross_heads: int
    cross_head_dim: int
    mlp_ratio: float
    grid: tuple[int, int]
    attention_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, layer, text_keys_values, text_bias, modulation):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block_modulation(self, x, modulation)
        kinds = dict(qk_norm=self.qk_norm, dtype=self.dtype, param_dtype=self.param_dtype)
        normed = modulate(layer_norm(x, self.norm_eps), shift_msa, scale_msa)
        self_attention = SelfAttention(self.heads, self.head_dim, self.attention_bias, linear=True, **kinds,
                                       name="attn1")
        x = x + gate_msa[:, None] * self_attention(normed)
        cross_attention = CrossAttention(self.cross_heads, self.cross_head_dim, True, **kinds, name="attn2")
        x = x + cross_attention(x, *text_keys_values, text_bias)
        normed = modulate(layer_norm(x, self.norm_eps), shift_mlp, scale_mlp)
        grid = normed.reshape(x.shape[0], *self.grid, x.shape[-1])
        ff = GLUMBConv(self.mlp_ratio, dtype=self.dtype, param_dtype=self.param_dtype, name="ff")(grid)
        return x + gate_mlp[:, None] * ff.reshape(x.shape), None


class TimestepGuidanceEmbedding(nn.Module):
    """diffusers' `SanaCombinedTimestepGuidanceEmbeddings` (SANA-Sprint): timestep and guidance
    embeddings summed -> (six modulation vectors [B, 6*D], the sum [B, D])."""

    dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep, guidance):
        embed = lambda x, name: MLPEmbedder(self.dim, self.dtype, self.param_dtype, name=name)(  # noqa: E731
            timestep_embedding(x, 256, flip_sin_to_cos=True, freq_shift=0.0).astype(self.dtype))
        emb = embed(timestep, "timestep_embedder") + embed(guidance, "guidance_embedder")
        modulation = nn.Dense(6 * self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear")(nn.silu(emb))
        return modulation, emb


@dataclasses.dataclass(frozen=True)
class SanaConfig(DiTConfig):
    in_channels: int = 32
    out_channels: int | None = 32
    num_attention_heads: int = 70
    attention_head_dim: int = 32
    num_layers: int = 20
    num_cross_attention_heads: int = 20
    cross_attention_head_dim: int = 112
    caption_channels: int = 2304
    mlp_ratio: float = 2.5
    attention_bias: bool = False
    sample_size: int = 32
    patch_size: int = 1
    norm_eps: float = 1e-6
    interpolation_scale: float | None = None
    guidance_embeds: bool = False
    guidance_embeds_scale: float = 0.1
    qk_norm: str | None = None
    timestep_scale: float = 1.0

    @staticmethod
    def check(config: dict) -> None:
        if config.get("norm_elementwise_affine", False):
            raise ValueError("SANA transformer config: norm_elementwise_affine must be false (every released model)")
        if config.get("qk_norm") not in (None, "rms_norm_across_heads"):
            raise ValueError(f"SANA transformer config: qk_norm must be null or 'rms_norm_across_heads', "
                             f"got {config['qk_norm']!r}")


class SanaText(DiTPart):
    """SANA's text part: caption projection, its RMS norm, each block's cross-attention keys and values."""

    @nn.compact
    def __call__(self, context, context_mask):
        cfg = self.config
        context = CaptionProjection(cfg.inner_dim, self.dtype, self.param_dtype, name="caption_projection")(
            context.astype(self.dtype))
        context = RMSNorm(1e-5, param_dtype=self.param_dtype, name="caption_norm")(context)
        return text_keys_values(context, context_mask, cfg.num_layers, heads=cfg.num_cross_attention_heads,
                                head_dim=cfg.cross_attention_head_dim, qk_norm=cfg.qk_norm is not None,
                                dtype=self.dtype, param_dtype=self.param_dtype)


class SanaStep(DiTPart):
    """SANA's step part: latents, the text part's output, timestep (and guidance [B] for
    SANA-Sprint) -> prediction."""

    @nn.compact
    def __call__(self, x, text, timestep, guidance=None):
        cfg, dim, patch = self.config, self.config.inner_dim, self.config.patch_size
        grid = (x.shape[-2] // patch, x.shape[-1] // patch)
        tokens = patchify(self, x.astype(self.dtype), dim, patch)
        if cfg.interpolation_scale is not None:
            pos = sincos_2d(dim, *grid, cfg.sample_size // patch, cfg.interpolation_scale)
            tokens = tokens + jnp.asarray(pos, self.dtype)[None]
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (x.shape[0],))
        if cfg.guidance_embeds:
            guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (x.shape[0],))
            modulation, emb = TimestepGuidanceEmbedding(dim, self.dtype, self.param_dtype, name="time_embed")(
                timestep, guidance)
        else:
            modulation, emb = AdaLNSingle(dim, False, self.dtype, self.param_dtype, name="time_embed")(timestep)
        tokens = scan_blocks(SanaBlock, blocks_stack(cfg.num_layers), tokens, text["bias"], modulation,
                             per_layer=(text["keys"], text["values"]), heads=cfg.num_attention_heads,
                             head_dim=cfg.attention_head_dim, cross_heads=cfg.num_cross_attention_heads,
                             cross_head_dim=cfg.cross_attention_head_dim, mlp_ratio=cfg.mlp_ratio, grid=grid,
                             attention_bias=cfg.attention_bias, qk_norm=cfg.qk_norm is not None,
                             norm_eps=cfg.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        return final_layer(self, tokens, emb, grid, patch, cfg.output_channels)


class SanaTransformer(TwoPartTransformer):
    """diffusers' `SanaTransformer2DModel`: (latents, caption tokens, their mask, timestep[,
    guidance]) -> prediction."""

    config_class = SanaConfig
    text_part = SanaText
    step_part = SanaStep
