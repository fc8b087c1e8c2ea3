"""PixArt-alpha / PixArt-Sigma transformer, as diffusers' `PixArtTransformer2DModel`.

Patch embedding with a fixed 2-D sin-cos position table, adaLN-single (one timestep MLP for
the whole model; each block adds its own learned `scale_shift_table` to the shared six
modulation vectors), then per block: modulated self-attention, plain cross-attention over the
projected caption tokens (masked by the text mask), modulated GELU feed-forward. The blocks
run under `models.layers.scan_blocks` over parameters stacked along a leading layer axis (`blocks/...`).
PixArt-alpha's resolution / aspect-ratio embeddings are there when the config asks for them.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.layers import (CrossAttentionCore, GELUFeedForward, LayerStack, MLPEmbedder, RMSNorm, ScannedBlock,
                           SelfAttentionCore, key_mask_bias, layer_norm, modulate, scan_blocks,
                           timestep_embedding)

def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[M] positions -> [M, dim]: [sin, cos] at frequencies 10000^(-2i/dim), float64."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = positions.reshape(-1)[:, None].astype(np.float64) * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, height: int, width: int, base_size: int, interpolation_scale: float) -> np.ndarray:
    """diffusers' `get_2d_sincos_pos_embed` for a (height, width) token grid -> [H*W, dim] float32,
    tokens row-major; the first half of the features encodes the column, the second the row."""
    rows = np.arange(height, dtype=np.float32) / (height / base_size) / interpolation_scale
    cols = np.arange(width, dtype=np.float32) / (width / base_size) / interpolation_scale
    col_grid, row_grid = np.meshgrid(cols, rows, indexing="xy")
    return np.concatenate([sincos_1d(dim // 2, col_grid), sincos_1d(dim // 2, row_grid)], axis=1).astype(np.float32)


def patchify(module: nn.Module, x, dim: int, patch: int):
    """[B, C, H, W] -> tokens [B, (H/p)*(W/p), dim] by a stride-p convolution `patch_embed`."""
    tokens = nn.Conv(dim, (patch, patch), strides=(patch, patch), padding="VALID", dtype=module.dtype,
                     param_dtype=module.param_dtype, name="patch_embed")(jnp.transpose(x, (0, 2, 3, 1)))
    return tokens.reshape(tokens.shape[0], -1, dim)


def unpatchify(x, height: int, width: int, patch: int, channels: int):
    """Tokens [B, h*w, p*p*C] -> [B, C, h*p, w*p] (diffusers' einsum nhwpqc->nchpwq)."""
    x = x.reshape(x.shape[0], height, width, patch, patch, channels)
    return jnp.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], channels, height * patch, width * patch)


def final_layer(module: nn.Module, tokens, emb, grid, patch: int, channels: int):
    """Modulated norm with the model's own `scale_shift_table` [2, D] (shift, scale) plus the
    timestep embedding, `proj_out`, unpatchify (PixArt and SANA)."""
    dim = tokens.shape[-1]
    table = module.param("scale_shift_table", nn.initializers.normal(dim**-0.5), (2, dim), module.param_dtype)
    shift, scale = table[0][None] + emb, table[1][None] + emb
    tokens = modulate(layer_norm(tokens, 1e-6), shift, scale)
    out = nn.Dense(patch * patch * channels, dtype=module.dtype, param_dtype=module.param_dtype,
                   name="proj_out")(tokens)
    return unpatchify(out, *grid, patch, channels)


def block_modulation(module: nn.Module, x, modulation):
    """The block's six adaLN vectors [B, D] each: its `scale_shift_table` [6, D] plus the shared
    modulation [B, 6*D] (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)."""
    dim = x.shape[-1]
    table = module.param("scale_shift_table", nn.initializers.normal(dim**-0.5), (6, dim), module.param_dtype)
    vectors = table[None].astype(modulation.dtype) + modulation.reshape(x.shape[0], 6, dim)
    return [vectors[:, i] for i in range(6)]


def relu_linear_attention(q, k, v):
    """out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + 1e-15) with ReLU'd q, k; [B, N, H, D]
    in, [B, N, H*D] out, in float32 (diffusers pads v with a row of ones for the denominator)."""
    q, k, v = (t.astype(jnp.float32) for t in (jax.nn.relu(q), jax.nn.relu(k), v))
    kv = jnp.einsum("bmhd,bmhe->bhed", k, v)
    numerator = jnp.einsum("bhed,bnhd->bnhe", kv, q)
    denominator = jnp.einsum("bmhd,bnhd->bnh", k, q)[..., None]
    out = numerator / (denominator + 1e-15)
    return out.reshape(*out.shape[:2], -1)


class Attention(nn.Module):
    """diffusers' `Attention` with to_q/to_k/to_v/to_out.0 (biased per `bias`) around a core;
    keys and values come from `context` when given (cross-attention). `qk_norm`: RMS norm of q
    and k over all heads (diffusers' "rms_norm_across_heads", SANA-Sprint). `linear`: SANA's ReLU
    linear self-attention in place of softmax attention."""

    heads: int
    head_dim: int
    bias: bool = True
    qk_norm: bool = False
    linear: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, context_bias=None):
        def project(name, source):
            y = nn.Dense(self.heads * self.head_dim, use_bias=self.bias, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=name)(source)
            if self.qk_norm and name != "to_v":
                y = RMSNorm(1e-5, param_dtype=self.param_dtype, name=name.replace("to_", "norm_"))(y)
            return y.reshape(*y.shape[:-1], self.heads, self.head_dim)

        source = x if context is None else context
        q, k, v = project("to_q", x), project("to_k", source), project("to_v", source)
        if self.linear:
            out = relu_linear_attention(q, k, v).astype(x.dtype)
        elif context is None:
            out = SelfAttentionCore(name="core")(q, k, v)
        else:
            out = CrossAttentionCore(name="core")(q, k, v, context_bias)
        return nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype, name="to_out")(out)


class PixArtBlock(ScannedBlock):
    """diffusers' `BasicTransformerBlock` with norm_type "ada_norm_single", as a scan body."""

    heads: int
    head_dim: int
    attention_bias: bool = True
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, layer, context, context_bias, modulation):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block_modulation(self, x, modulation)
        attention = lambda name: Attention(  # noqa: E731
            self.heads, self.head_dim, self.attention_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        x = x + gate_msa[:, None] * attention("attn1")(modulate(layer_norm(x, self.norm_eps), shift_msa, scale_msa))
        x = x + attention("attn2")(x, context, context_bias)  # PixArt: no norm before cross-attention
        normed = modulate(layer_norm(x, self.norm_eps), shift_mlp, scale_mlp)
        ff = GELUFeedForward(dtype=self.dtype, param_dtype=self.param_dtype, name="ff")(normed)
        return x + gate_mlp[:, None] * ff, None


def blocks_stack(num_layers: int) -> LayerStack:
    """The scanned blocks: parameters stacked under `blocks`, layer i unrolled is `blocks_i`
    (diffusers' `transformer_blocks.i`)."""
    return LayerStack("blocks", range(num_layers), "blocks")


class CaptionProjection(nn.Module):
    """diffusers' `PixArtAlphaTextProjection` (act "gelu_tanh"): Linear -> GELU(tanh) -> Linear."""

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda name: nn.Dense(  # noqa: E731
            self.features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        return dense("linear_2")(nn.gelu(dense("linear_1")(x), approximate=True))


class AdaLNSingle(nn.Module):
    """diffusers' `AdaLayerNormSingle`: timestep (+ resolution and aspect ratio) -> (six
    modulation vectors [B, 6*D], the embedding [B, D] the final layer uses)."""

    dim: int
    use_additional_conditions: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep, resolution=None, aspect_ratio=None):
        embed = lambda x, features, name: MLPEmbedder(features, self.dtype, self.param_dtype, name=name)(  # noqa: E731
            timestep_embedding(x, 256, flip_sin_to_cos=True, freq_shift=0.0).astype(self.dtype))
        emb = embed(timestep, self.dim, "timestep_embedder")
        if self.use_additional_conditions:
            size_dim = self.dim // 3
            batch = timestep.shape[0]
            sizes = embed(resolution.reshape(-1), size_dim, "resolution_embedder").reshape(batch, -1)
            ratios = embed(aspect_ratio.reshape(-1), size_dim, "aspect_ratio_embedder").reshape(batch, -1)
            emb = emb + jnp.concatenate([sizes, ratios], axis=1)
        modulation = nn.Dense(6 * self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear")(nn.silu(emb))
        return modulation, emb


class DiTConfig:
    """What the PixArt and SANA config dataclasses share: reading diffusers' config.json (keys of
    other versions ignored, after the subclass's `check`) and the derived widths."""

    @staticmethod
    def check(config: dict) -> None:
        """Raise for config values the model does not implement."""

    @classmethod
    def from_dict(cls, config: dict):
        cls.check(config)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels


@dataclasses.dataclass(frozen=True)
class PixArtConfig(DiTConfig):
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = 8
    num_layers: int = 28
    attention_bias: bool = True
    sample_size: int = 128
    patch_size: int = 2
    norm_eps: float = 1e-6
    interpolation_scale: float | None = None
    use_additional_conditions: bool | None = None
    caption_channels: int | None = None

    @staticmethod
    def check(config: dict) -> None:
        for key, allowed in (("norm_type", "ada_norm_single"), ("activation_fn", "gelu-approximate")):
            if config.get(key, allowed) != allowed:
                raise ValueError(f"PixArt transformer config: {key} must be {allowed!r}, got {config[key]!r}")

    @property
    def additional_conditions(self) -> bool:
        """diffusers' default: on for the 1024px (sample_size 128) PixArt-alpha models."""
        return self.sample_size == 128 if self.use_additional_conditions is None else self.use_additional_conditions


class PixArtTransformer(nn.Module):
    """latents [B, C, H, W], caption tokens [B', L, caption_channels], their mask [B', L],
    timestep [B] -> prediction [B, out_channels, H, W] (B' > B only inside nag_jax.guided)."""

    config: PixArtConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @classmethod
    def from_config(cls, config: dict, dtype=jnp.float32, param_dtype=jnp.float32):
        return cls(PixArtConfig.from_dict(config), dtype=dtype, param_dtype=param_dtype)

    def pos_embed(self, height: int, width: int) -> np.ndarray:
        cfg = self.config
        scale = cfg.interpolation_scale if cfg.interpolation_scale is not None else max(cfg.sample_size // 64, 1)
        return sincos_2d(cfg.inner_dim, height, width, cfg.sample_size // cfg.patch_size, scale)

    @nn.compact
    def __call__(self, x, context, context_mask, timestep, resolution=None, aspect_ratio=None):
        cfg, dim, patch = self.config, self.config.inner_dim, self.config.patch_size
        height, width = x.shape[-2] // patch, x.shape[-1] // patch
        tokens = patchify(self, x.astype(self.dtype), dim, patch)
        tokens = tokens + jnp.asarray(self.pos_embed(height, width), self.dtype)[None]
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (x.shape[0],))
        modulation, emb = AdaLNSingle(dim, cfg.additional_conditions, self.dtype, self.param_dtype,
                                      name="adaln_single")(timestep, resolution, aspect_ratio)
        context = context.astype(self.dtype)
        if cfg.caption_channels is not None:
            context = CaptionProjection(dim, self.dtype, self.param_dtype, name="caption_projection")(context)
        tokens = scan_blocks(PixArtBlock, blocks_stack(cfg.num_layers), tokens, context, key_mask_bias(context_mask),
                             modulation, heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim,
                             attention_bias=cfg.attention_bias, norm_eps=cfg.norm_eps, dtype=self.dtype,
                             param_dtype=self.param_dtype)

        return final_layer(self, tokens, emb, (height, width), patch, cfg.output_channels)
