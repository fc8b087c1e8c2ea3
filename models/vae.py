"""diffusers' AutoencoderKL: the image <-> latent VAE of SD1.5, SDXL (4 channels), SD3 and Flux
(16 channels, no quant convs, a shift factor).

Images and latents are NCHW at the boundaries (diffusers' layout); NHWC inside. Each layer is
named by its diffusers module path ("down_blocks.0.resnets.1.conv1") under `encoder` /
`decoder`, so the checkpoint key map only swaps leaf names and layouts.

Latent scaling as the diffusers pipelines apply it (`model_to_latents` before `decode`,
`latents_to_model` after `encode`): Flux/SD3 `z / scaling_factor + shift_factor`; SDXL-style
configs with `latents_mean`/`latents_std` `z * std / scaling_factor + mean`; else `z / scaling_factor`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import SelfAttentionCore

RESNET_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, config: dict) -> "VAEConfig":
        """From diffusers' vae/config.json (unknown keys ignored)."""
        blocks = len(config.get("block_out_channels", cls.block_out_channels))
        expected = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D", "act_fn": "silu"}
        for key, allowed in expected.items():
            values = config.get(key, [allowed] * blocks)
            values = [values] if isinstance(values, str) else values
            if any(v != allowed for v in values):
                raise ValueError(f"VAE config: {key}={values!r} is not supported; only {allowed!r} is")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in names and v is not None}
        for key in ("block_out_channels", "latents_mean", "latents_std"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


class _Layers:
    """Named Conv/GroupNorm/Dense constructors sharing the module's dtypes (created inside a
    compact method, so they belong to it)."""

    def __init__(self, module, groups):
        self.kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)
        self.groups = groups

    def conv(self, name, features, kernel=3, strides=1, padding=None):
        pad = kernel // 2 if padding is None else padding
        pad = ((pad, pad), (pad, pad)) if isinstance(pad, int) else pad
        return nn.Conv(features, (kernel, kernel), strides=strides, padding=pad, name=name, **self.kw)

    def norm(self, name):
        return nn.GroupNorm(self.groups, epsilon=RESNET_EPS, use_fast_variance=False, name=name, **self.kw)

    def dense(self, name, features):
        return nn.Dense(features, name=name, **self.kw)

    def resnet(self, name, x, out_channels):
        """ResnetBlock2D without a time embedding: (norm, SiLU, conv) twice, 1x1 shortcut when
        the channel count changes."""
        h = self.conv(f"{name}.conv1", out_channels)(nn.silu(self.norm(f"{name}.norm1")(x)))
        h = self.conv(f"{name}.conv2", out_channels)(nn.silu(self.norm(f"{name}.norm2")(h)))
        if x.shape[-1] != out_channels:
            x = self.conv(f"{name}.conv_shortcut", out_channels, kernel=1)(x)
        return x + h

    def attention(self, name, x):
        """Single-head self-attention over the H*W positions, GroupNorm first, residual added."""
        batch, height, width, channels = x.shape
        h = self.norm(f"{name}.group_norm")(x).reshape(batch, height * width, 1, channels)
        q, k, v = (self.dense(f"{name}.{n}", channels)(h) for n in ("to_q", "to_k", "to_v"))
        attended = SelfAttentionCore(name=f"{name}.core")(q, k, v)
        return x + self.dense(f"{name}.to_out.0", channels)(attended).reshape(x.shape)

    def mid_block(self, x, add_attention):
        channels = x.shape[-1]
        x = self.resnet("mid_block.resnets.0", x, channels)
        if add_attention:
            x = self.attention("mid_block.attentions.0", x)
        return self.resnet("mid_block.resnets.1", x, channels)


class VAEEncoder(nn.Module):
    """NHWC images -> NHWC moments (mean and logvar, 2 * latent_channels)."""

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        make = _Layers(self, cfg.norm_num_groups)
        x = make.conv("conv_in", cfg.block_out_channels[0])(x)
        for i, channels in enumerate(cfg.block_out_channels):
            for j in range(cfg.layers_per_block):
                x = make.resnet(f"down_blocks.{i}.resnets.{j}", x, channels)
            if i < len(cfg.block_out_channels) - 1:
                # diffusers pads right and bottom only, then a stride-2 valid conv.
                x = make.conv(f"down_blocks.{i}.downsamplers.0.conv", channels, strides=2, padding=((0, 1), (0, 1)))(x)
        x = make.mid_block(x, cfg.mid_block_add_attention)
        x = nn.silu(make.norm("conv_norm_out")(x))
        return make.conv("conv_out", 2 * cfg.latent_channels)(x)


class VAEDecoder(nn.Module):
    """NHWC latents -> NHWC images."""

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        make = _Layers(self, cfg.norm_num_groups)
        channels = tuple(reversed(cfg.block_out_channels))
        x = make.conv("conv_in", channels[0])(z)
        x = make.mid_block(x, cfg.mid_block_add_attention)
        for i, block_channels in enumerate(channels):
            for j in range(cfg.layers_per_block + 1):
                x = make.resnet(f"up_blocks.{i}.resnets.{j}", x, block_channels)
            if i < len(channels) - 1:
                x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour 2x
                x = make.conv(f"up_blocks.{i}.upsamplers.0.conv", block_channels)(x)
        x = nn.silu(make.norm("conv_norm_out")(x))
        return make.conv("conv_out", cfg.out_channels)(x)


def _nhwc(x):
    return jnp.transpose(x, (0, 2, 3, 1))


def _nchw(x):
    return jnp.transpose(x, (0, 3, 1, 2))


class AutoencoderKL(nn.Module):
    """`encode(images) -> (mean, logvar)`, `decode(latents) -> images`, all NCHW; images in
    [-1, 1]. Call with `method="encode"` / `"decode"`; `__call__` runs both (for init)."""

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @classmethod
    def from_config(cls, config: dict, dtype=jnp.float32, param_dtype=jnp.float32):
        return cls(VAEConfig.from_dict(config), dtype=dtype, param_dtype=param_dtype)

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = VAEEncoder(cfg, **kw)
        self.decoder = VAEDecoder(cfg, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), **kw)

    def encode(self, images):
        """The latent distribution's mean and log-variance (clipped to [-30, 20] as diffusers does)."""
        moments = self.encoder(_nhwc(images.astype(self.dtype)))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(_nchw(moments), 2, axis=1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents):
        z = _nhwc(latents.astype(self.dtype))
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return _nchw(self.decoder(z))

    def __call__(self, images):
        mean, _ = self.encode(images)
        return self.decode(mean)


def sample_latents(mean, logvar, key):
    """A draw from the encoder's diagonal Gaussian: mean + exp(logvar / 2) * noise."""
    noise = jax.random.normal(key, mean.shape, jnp.float32).astype(mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * noise


def _channel_stats(config: VAEConfig, latents):
    """(mean, std) per channel shaped [1, C, 1, 1]: latents_mean/std, or shift_factor and 1."""
    if (config.latents_mean is None) != (config.latents_std is None):
        raise ValueError("VAE config: latents_mean and latents_std must be given together")
    if config.latents_mean is not None:
        as_channels = lambda v: jnp.asarray(v, latents.dtype).reshape(1, -1, 1, 1)  # noqa: E731
        return as_channels(config.latents_mean), as_channels(config.latents_std)
    return jnp.asarray(config.shift_factor or 0.0, latents.dtype), jnp.asarray(1.0, latents.dtype)


def model_to_latents(config: VAEConfig, latents):
    """Denoiser-space latents -> what `decode` takes (the pipelines' step before vae.decode)."""
    mean, std = _channel_stats(config, latents)
    return latents * std / config.scaling_factor + mean


def latents_to_model(config: VAEConfig, latents):
    """`encode` output -> denoiser-space latents (image-to-image; the inverse of model_to_latents)."""
    mean, std = _channel_stats(config, latents)
    return (latents - mean) * config.scaling_factor / std
