"""Deep-compression autoencoder (DC-AE), as diffusers' `AutoencoderDC` (SANA's VAE: 32x, 32 channels).

Channels-last throughout. Stages of ResBlocks (conv, act, conv, norm, residual) or
EfficientViT blocks (multi-scale ReLU linear attention + GLU-MBConv), joined by
down/up-sampling blocks whose shortcuts average / repeat channels around pixel
(un)shuffles; the encoder ends and the decoder starts with such a channel shortcut.
Decoder stages may use BatchNorm (inference statistics) and ReLU (SANA's released DC-AE).
Module names follow diffusers' keys: `encoder/down_blocks_<stage>_<index>` for `encoder.down_blocks.<stage>.<index>`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.pixart import relu_linear_attention
from models.sana import BiasedRMSNorm, GLUMBConv

ACTIVATIONS = {"silu": jax.nn.silu, "relu": jax.nn.relu, "relu6": jax.nn.relu6}


def pixel_shuffle(x, r: int = 2):
    """[B, H, W, C*r*r] -> [B, H*r, W*r, C] (torch's pixel_shuffle channel order)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, c // (r * r), r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c // (r * r))


def pixel_unshuffle(x, r: int = 2):
    """[B, H*r, W*r, C] -> [B, H, W, C*r*r] (torch's pixel_unshuffle channel order)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h // r, w // r, c * r * r)


def average_channel_groups(x, groups_of: int):
    return x.reshape(*x.shape[:-1], -1, groups_of).mean(-1)


class BatchNorm(nn.Module):
    """torch BatchNorm2d in eval mode over the last axis (weight, bias, running statistics)."""

    eps: float = 1e-5
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = (x.shape[-1],)
        weight, bias = (self.param(n, init, shape, self.param_dtype) for n, init in
                        (("weight", nn.initializers.ones), ("bias", nn.initializers.zeros)))
        mean = self.param("running_mean", nn.initializers.zeros, shape, self.param_dtype)
        var = self.param("running_var", nn.initializers.ones, shape, self.param_dtype)
        return ((x - mean) * jax.lax.rsqrt(var + self.eps) * weight + bias).astype(x.dtype)


def norm_layer(norm_type: str, param_dtype, name: str) -> nn.Module:
    if norm_type == "rms_norm":
        return BiasedRMSNorm(param_dtype=param_dtype, name=name)
    if norm_type == "batch_norm":
        return BatchNorm(param_dtype=param_dtype, name=name)
    raise ValueError(f"DC-AE config: norm type must be 'rms_norm' or 'batch_norm', got {norm_type!r}")


class ResBlock(nn.Module):
    norm_type: str = "rms_norm"
    act_fn: str = "silu"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda name, bias: nn.Conv(x.shape[-1], (3, 3), padding=1, use_bias=bias, dtype=self.dtype,  # noqa: E731
                                          param_dtype=self.param_dtype, name=name)
        h = conv("conv2", False)(ACTIVATIONS[self.act_fn](conv("conv1", True)(x)))
        return x + norm_layer(self.norm_type, self.param_dtype, "norm")(h)


class MultiscaleLinearAttention(nn.Module):
    """diffusers' `SanaMultiscaleLinearAttention`: q, k, v (no bias) and their multi-scale
    aggregates (depthwise kxk, grouped 1x1) split into groups of 3 * head_dim channels, each
    group's (q, k, v) thirds through ReLU linear attention; out projection, norm, residual."""

    head_dim: int
    kernel_sizes: tuple[int, ...] = (5,)
    norm_type: str = "rms_norm"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        heads = channels // self.head_dim
        inner = heads * self.head_dim
        dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype,  # noqa: E731
                                                param_dtype=self.param_dtype, name=name)
        qkv = jnp.concatenate([dense(inner, f"to_{n}")(x) for n in "qkv"], axis=-1)
        scales = [qkv]
        for i, size in enumerate(self.kernel_sizes):
            h = nn.Conv(3 * inner, (size, size), padding=size // 2, feature_group_count=3 * inner, use_bias=False,
                        dtype=self.dtype, param_dtype=self.param_dtype, name=f"to_qkv_multiscale_{i}_proj_in")(qkv)
            scales.append(nn.Conv(3 * inner, (1, 1), feature_group_count=3 * heads, use_bias=False, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=f"to_qkv_multiscale_{i}_proj_out")(h))
        b, height, width, _ = x.shape
        groups = jnp.concatenate(scales, axis=-1).reshape(b, height * width, -1, 3 * self.head_dim)
        q, k, v = jnp.split(groups, 3, axis=-1)
        out = relu_linear_attention(q, k, v).astype(x.dtype).reshape(b, height, width, -1)
        return x + norm_layer(self.norm_type, self.param_dtype, "norm_out")(dense(channels, "to_out")(out))


class EfficientViTBlock(nn.Module):
    head_dim: int
    kernel_sizes: tuple[int, ...]
    norm_type: str = "rms_norm"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = MultiscaleLinearAttention(self.head_dim, self.kernel_sizes, self.norm_type, self.dtype, self.param_dtype,
                                      name="attn")(x)
        return GLUMBConv(4.0, norm_residual=True, dtype=self.dtype, param_dtype=self.param_dtype, name="conv_out")(x)


@dataclasses.dataclass(frozen=True)
class DCAEConfig:
    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    encoder_block_types: tuple | str = "ResBlock"
    decoder_block_types: tuple | str = "ResBlock"
    encoder_block_out_channels: tuple = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple = (2, 2, 2, 3, 3, 3)
    decoder_layers_per_block: tuple = (3, 3, 3, 3, 3, 3)
    encoder_qkv_multiscales: tuple = ((), (), (), (5,), (5,), (5,))
    decoder_qkv_multiscales: tuple = ((), (), (), (5,), (5,), (5,))
    upsample_block_type: str = "pixel_shuffle"
    downsample_block_type: str = "pixel_unshuffle"
    decoder_norm_types: tuple | str = "rms_norm"
    decoder_act_fns: tuple | str = "silu"
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 1.0

    @classmethod
    def from_dict(cls, config: dict) -> "DCAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        freeze = lambda v: tuple(freeze(i) for i in v) if isinstance(v, list) else v  # noqa: E731
        return cls(**{k: freeze(v) for k, v in config.items() if k in names})

    @property
    def spatial_compression_ratio(self) -> int:
        return 2 ** (len(self.encoder_block_out_channels) - 1)


def _per_stage(value, stages: int) -> tuple:
    return (value,) * stages if isinstance(value, str) else tuple(value)


def _conv(module, features, name, kernel=3, strides=1):
    return nn.Conv(features, (kernel, kernel), strides=strides, padding=kernel // 2, dtype=module.dtype,
                   param_dtype=module.param_dtype, name=name)


def _block(module, kind, norm_type, act_fn, scales, name):
    if kind == "ResBlock":
        return ResBlock(norm_type, act_fn, module.dtype, module.param_dtype, name=name)
    if kind == "EfficientViTBlock":
        return EfficientViTBlock(module.config.attention_head_dim, tuple(scales), norm_type, module.dtype,
                                 module.param_dtype, name=name)
    raise ValueError(f"DC-AE config: block type must be 'ResBlock' or 'EfficientViTBlock', got {kind!r}")


def _down(module, x, features, name, shortcut=True):
    """DCDownBlock2d: stride-2 conv, or conv + pixel unshuffle; shortcut: unshuffled input averaged in groups."""
    unshuffle = module.config.downsample_block_type == "pixel_unshuffle"
    h = _conv(module, features // 4 if unshuffle else features, name, strides=1 if unshuffle else 2)(x)
    h = pixel_unshuffle(h) if unshuffle else h
    if not shortcut:
        return h
    return h + average_channel_groups(pixel_unshuffle(x), x.shape[-1] * 4 // features)


def _up(module, x, features, name, shortcut=True):
    """DCUpBlock2d: nearest 2x + conv, or conv + pixel shuffle; shortcut: repeated channels shuffled."""
    if module.config.upsample_block_type == "interpolate":
        h = _conv(module, features, name)(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
    else:
        h = pixel_shuffle(_conv(module, features * 4, name)(x))
    if not shortcut:
        return h
    return h + pixel_shuffle(jnp.repeat(x, features * 4 // x.shape[-1], axis=-1))


class DCEncoder(nn.Module):
    config: DCAEConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        widths, layers = cfg.encoder_block_out_channels, cfg.encoder_layers_per_block
        kinds = _per_stage(cfg.encoder_block_types, len(widths))
        h = jnp.transpose(x, (0, 2, 3, 1)).astype(self.dtype)
        if layers[0] > 0:
            h = _conv(self, widths[0], "conv_in")(h)
        else:
            h = _down(self, h, widths[1], "conv_in", shortcut=False)
        for stage, (width, count) in enumerate(zip(widths, layers)):
            for i in range(count):
                h = _block(self, kinds[stage], "rms_norm", "silu", cfg.encoder_qkv_multiscales[stage],
                           f"down_blocks_{stage}_{i}")(h)
            if stage < len(widths) - 1 and count > 0:
                h = _down(self, h, widths[stage + 1], f"down_blocks_{stage}_{count}")
        out = _conv(self, cfg.latent_channels, "conv_out")(h)
        if cfg.encoder_out_shortcut:
            out = out + average_channel_groups(h, widths[-1] // cfg.latent_channels)
        return jnp.transpose(out, (0, 3, 1, 2))


class DCDecoder(nn.Module):
    config: DCAEConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        widths, layers = cfg.decoder_block_out_channels, cfg.decoder_layers_per_block
        stages = len(widths)
        kinds, norms = _per_stage(cfg.decoder_block_types, stages), _per_stage(cfg.decoder_norm_types, stages)
        acts = _per_stage(cfg.decoder_act_fns, stages)
        z = jnp.transpose(z, (0, 2, 3, 1)).astype(self.dtype)
        h = _conv(self, widths[-1], "conv_in")(z)
        if cfg.decoder_in_shortcut:
            h = h + jnp.repeat(z, widths[-1] // cfg.latent_channels, axis=-1)
        for stage in reversed(range(stages)):
            count, first = layers[stage], 0
            if stage < stages - 1 and count > 0:
                h = _up(self, h, widths[stage], f"up_blocks_{stage}_0")
                first = 1
            for i in range(count):
                h = _block(self, kinds[stage], norms[stage], acts[stage], cfg.decoder_qkv_multiscales[stage],
                           f"up_blocks_{stage}_{first + i}")(h)
        h = ACTIVATIONS[cfg.decoder_conv_act_fn](BiasedRMSNorm(param_dtype=self.param_dtype, name="norm_out")(h))
        if layers[0] > 0:
            h = _conv(self, cfg.in_channels, "conv_out")(h)
        else:
            h = _up(self, h, cfg.in_channels, "conv_out", shortcut=False)
        return jnp.transpose(h, (0, 3, 1, 2))


class DCAutoencoder(nn.Module):
    """`encode(x)`: images [B, 3, H, W] in [-1, 1] -> latents [B, C, H/f, W/f]; `decode(z)`: back
    (diffusers' `AutoencoderDC.encode(...).latent` / `.decode(...).sample`, without scaling_factor)."""

    config: DCAEConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @classmethod
    def from_config(cls, config: dict, dtype=jnp.float32, param_dtype=jnp.float32):
        return cls(DCAEConfig.from_dict(config), dtype=dtype, param_dtype=param_dtype)

    def setup(self):
        self.encoder = DCEncoder(self.config, self.dtype, self.param_dtype)
        self.decoder = DCDecoder(self.config, self.dtype, self.param_dtype)

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)

    def __call__(self, x):
        return self.decode(self.encode(x))
