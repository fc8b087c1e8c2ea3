"""diffusers' AutoencoderKLWan: causal 3D convolutions, run frame-chunk by frame-chunk with a
causal cache. Wan2.1's VAE (8x spatial, 4x temporal, z_dim 16) and Wan2.2's (`is_residual`:
each down / up stage adds a parameter-free shortcut that averages / duplicates space-time
blocks into channels; `patch_size` 2: pixels folded 2x2 into channels before the encoder and
back after the decoder, so 16x spatial; z_dim 48).

Videos and latents are [B, C, F, H, W] at the public functions (diffusers' layout) and
[B, F, H, W, C] inside. Layers are named by their diffusers module path
("down_blocks.2.resample.1", "up_blocks.0.upsamplers.0.time_conv") under `encoder` / `decoder`,
so the checkpoint key map only picks leaf names and layouts.

The causal cache. Every temporal convolution sees only the past: a kernel-3 convolution on a
chunk of frames is computed over [the last 2 frames it saw before; the chunk], zeros before the
first chunk. Those frames live in the `cache` variable collection, one entry per convolution, so
a chunk's output equals the output of the whole video at once. `encode_video` and
`decode_video` run the first chunk (one frame / one latent frame) on its own, because the
temporal resamplers treat it specially (as diffusers does), then `lax.scan` over the remaining
chunks carrying the cache: the traced program and the working memory do not depend on the
number of frames.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import SelfAttentionCore

# Wan2.1's published vae/config.json values, used when a single file comes without a config.
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
# Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json (its latents_mean / latents_std aside), used
# when Wan2.2's single file comes without a config.
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, patch_size=2, in_channels=12,
                 out_channels=12)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # diffusers' spelling
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    in_channels: int = 3  # after patchification (Wan2.2: 3 * 2 * 2)
    out_channels: int = 3
    is_residual: bool = False
    patch_size: int | None = None

    @classmethod
    def from_dict(cls, config: dict) -> "WanVAEConfig":
        """From diffusers' vae/config.json (unknown keys ignored, e.g. Wan2.2's `clip_output`:
        diffusers' decode clamps whatever it says)."""
        if config.get("attn_scales"):
            raise ValueError(f"Wan VAE config: attn_scales={config['attn_scales']!r} is not supported; allowed: []")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in names and v is not None}
        for key in ("dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
            if key in values:
                values[key] = tuple(values[key])
        config = cls(**values)
        if len(config.temperal_downsample) != len(config.dim_mult) - 1:
            raise ValueError(f"Wan VAE config: temperal_downsample needs {len(config.dim_mult) - 1} entries "
                             f"(one per downsampling stage), got {config.temperal_downsample!r}")
        return config

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def patch(self) -> int:
        return self.patch_size or 1

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * self.patch

    @property
    def pixel_channels(self) -> int:
        return self.in_channels // self.patch**2


class CausalConv3d(nn.Module):
    """Conv3d, causal in time: each output frame sees its own and earlier input frames.

    With temporal stride s the layer keeps the last (kernel - s) input frames of the previous
    chunks in its cache (chunks must then hold multiples of s frames), zeros before the first.
    """

    features: int
    kernel_size: tuple[int, int, int]
    temporal_stride: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, convolve: bool = True, remember: bool = True):
        """x [B, F, H, W, C]. convolve=False returns x as it is and only updates the cache
        (remember=False: not even that, the cache only comes into being)."""
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (*self.kernel_size, x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        history = self.kernel_size[0] - self.temporal_stride
        if history > 0:
            cache = self.variable("cache", "frames", jnp.zeros, (x.shape[0], history, *x.shape[2:]), x.dtype)
            extended = jnp.concatenate([cache.value, x], axis=1)
            if remember:
                cache.value = extended[:, -history:]
            x = extended if convolve else x
        if not convolve:
            return x
        _, kh, kw = self.kernel_size
        y = jax.lax.conv_general_dilated(x, kernel, (self.temporal_stride, 1, 1),
                                         ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
                                         dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return y + bias


class RMSNorm(nn.Module):
    """Wan's RMS_norm: x / ||x|| over channels * sqrt(channels) * gamma (normalised in float32)."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        gamma = self.param("gamma", nn.initializers.ones, (channels,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
        normalized = (x32 / jnp.maximum(norm, 1e-12)).astype(self.dtype)  # torch F.normalize's eps
        return normalized * (channels**0.5 * gamma).astype(self.dtype)


class _Layers:
    """Named layer constructors sharing the module's dtypes (made inside a compact method, so
    the layers belong to it)."""

    def __init__(self, module):
        self.kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)

    def causal(self, name, features, kernel=3, **kwargs):
        size = kernel if isinstance(kernel, tuple) else (kernel,) * 3
        return CausalConv3d(features, size, name=name, **kwargs, **self.kw)

    def conv2d(self, name, features, kernel=3, strides=1, padding=1):
        """A 2D convolution applied to every frame (Flax folds the frame axis into the batch)."""
        return nn.Conv(features, (kernel, kernel), strides=strides, padding=padding, name=name, **self.kw)

    def norm(self, name):
        return RMSNorm(name=name, **self.kw)

    def resnet(self, name, x, out_channels):
        """(RMS norm, SiLU, causal conv) twice, plus a 1x1x1 shortcut when the width changes."""
        shortcut = self.causal(f"{name}.conv_shortcut", out_channels, 1)(x) if x.shape[-1] != out_channels else x
        h = self.causal(f"{name}.conv1", out_channels)(nn.silu(self.norm(f"{name}.norm1")(x)))
        h = self.causal(f"{name}.conv2", out_channels)(nn.silu(self.norm(f"{name}.norm2")(h)))
        return h + shortcut

    def attention(self, name, x):
        """Single-head self-attention over each frame's H*W positions, RMS norm first, residual added."""
        batch, frames, height, width, channels = x.shape
        qkv = self.conv2d(f"{name}.to_qkv", 3 * channels, kernel=1, padding=0)(self.norm(f"{name}.norm")(x))
        q, k, v = jnp.split(qkv.reshape(batch * frames, height * width, 1, 3 * channels), 3, axis=-1)
        attended = SelfAttentionCore(name=f"{name}.core")(q, k, v).reshape(x.shape)
        return x + self.conv2d(f"{name}.proj", channels, kernel=1, padding=0)(attended)

    def mid_block(self, x):
        channels = x.shape[-1]
        x = self.resnet("mid_block.resnets.0", x, channels)
        x = self.attention("mid_block.attentions.0", x)
        return self.resnet("mid_block.resnets.1", x, channels)

    def head(self, x, features):
        return self.causal("conv_out", features)(nn.silu(self.norm("norm_out")(x)))


class _WanModule(nn.Module):
    config: WanVAEConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32


def average_down(x, out_channels: int, factor_t: int, factor_s: int):
    """Wan2.2's down-stage shortcut (diffusers' AvgDown3D): each factor_t x factor_s x factor_s
    block (zero frames padded in front to whole blocks) folded into channels, then channel groups
    averaged down to out_channels."""
    batch, frames, height, width, channels = x.shape
    x = jnp.pad(x, ((0, 0), ((-frames) % factor_t, 0), (0, 0), (0, 0), (0, 0)))
    frames, height, width = x.shape[1] // factor_t, height // factor_s, width // factor_s
    x = x.reshape(batch, frames, factor_t, height, factor_s, width, factor_s, channels)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)  # channel-major: (channel, t, h, w) flattened
    return x.reshape(batch, frames, height, width, out_channels, -1).mean(axis=-1)


def duplicate_up(x, out_channels: int, factor_t: int, factor_s: int, first_chunk: bool):
    """Wan2.2's up-stage shortcut (diffusers' DupUp3D): channels repeated, then unfolded into
    factor_t x factor_s x factor_s blocks; the first chunk keeps its last frame only."""
    batch, frames, height, width, channels = x.shape
    x = jnp.repeat(x, out_channels * factor_t * factor_s**2 // channels, axis=-1)
    x = x.reshape(batch, frames, height, width, out_channels, factor_t, factor_s, factor_s)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(batch, frames * factor_t, height * factor_s, width * factor_s,
                                                    out_channels)
    return x[:, factor_t - 1:] if first_chunk else x


def patchify(x, patch: int):
    """[B, F, H, W, C] -> [B, F, H/p, W/p, C * p * p], channels ordered (C, column, row) as diffusers'."""
    batch, frames, height, width, channels = x.shape
    x = x.reshape(batch, frames, height // patch, patch, width // patch, patch, channels)
    return x.transpose(0, 1, 2, 4, 6, 5, 3).reshape(batch, frames, height // patch, width // patch, -1)


def unpatchify(x, patch: int):
    """The inverse of `patchify`."""
    batch, frames, height, width, channels = x.shape
    x = x.reshape(batch, frames, height, width, channels // patch**2, patch, patch)
    return x.transpose(0, 1, 2, 6, 3, 5, 4).reshape(batch, frames, height * patch, width * patch, -1)


class WanEncoder3d(_WanModule):
    """[B, F, H, W, in_channels] chunk -> [B, F', H/8, W/8, 2 * z_dim] (first chunk: 1 frame ->
    1; later chunks: temporal_factor frames -> 1)."""

    @nn.compact
    def __call__(self, x, first_chunk: bool = False):
        cfg = self.config
        make = _Layers(self)
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        x = make.causal("conv_in", dims[0])(x)
        index = 0  # Wan2.1: diffusers numbers resnets and resamplers in one flat down_blocks list
        for stage, out_dim in enumerate(dims[1:]):
            down = stage < len(cfg.dim_mult) - 1
            temporal = down and cfg.temperal_downsample[stage]
            if cfg.is_residual:
                shortcut = average_down(x, out_dim, 2 if temporal else 1, 2 if down else 1)
                resnets = [f"down_blocks.{stage}.resnets.{j}" for j in range(cfg.num_res_blocks)]
                resampler = f"down_blocks.{stage}.downsampler"
            else:
                resnets = [f"down_blocks.{index + j}" for j in range(cfg.num_res_blocks)]
                resampler = f"down_blocks.{index + cfg.num_res_blocks}"
                index += cfg.num_res_blocks + down
            for name in resnets:
                x = make.resnet(name, x, out_dim)
            if down:
                # Pad right and bottom only, then a stride-2 valid convolution.
                x = make.conv2d(f"{resampler}.resample.1", out_dim, strides=2, padding=((0, 1), (0, 1)))(x)
                if temporal:
                    # Stride-2 causal time conv; the first frame passes through unchanged.
                    time_conv = make.causal(f"{resampler}.time_conv", out_dim, (3, 1, 1), temporal_stride=2)
                    x = time_conv(x, convolve=not first_chunk)
            if cfg.is_residual:
                x = x + shortcut
        x = make.mid_block(x)
        return make.head(x, 2 * cfg.z_dim)


class WanDecoder3d(_WanModule):
    """[B, T, h, w, z_dim] chunk -> [B, F, 8h, 8w, out_channels] (first chunk: 1 latent frame ->
    1 frame; later chunks: each latent frame -> temporal_factor frames)."""

    @nn.compact
    def __call__(self, z, first_chunk: bool = False):
        cfg = self.config
        make = _Layers(self)
        base = cfg.decoder_base_dim or cfg.base_dim
        dims = [base * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]  # mid block, then each stage
        temperal_upsample = tuple(reversed(cfg.temperal_downsample))
        x = make.causal("conv_in", dims[0])(z)
        x = make.mid_block(x)
        for stage, out_dim in enumerate(dims[1:]):
            up = stage < len(cfg.dim_mult) - 1
            temporal = up and temperal_upsample[stage]
            shortcut = x
            for j in range(cfg.num_res_blocks + 1):
                x = make.resnet(f"up_blocks.{stage}.resnets.{j}", x, out_dim)
            if not up:
                break
            name = f"up_blocks.{stage}." + ("upsampler" if cfg.is_residual else "upsamplers.0")
            if temporal:
                # Each frame becomes two (the conv's 2C outputs are [even frame; odd frame]); the
                # first chunk's frame stays one, and its cache stays empty (diffusers' "Rep").
                time_conv = make.causal(f"{name}.time_conv", 2 * out_dim, (3, 1, 1))
                doubled = time_conv(x, convolve=not first_chunk, remember=not first_chunk)
                if not first_chunk:
                    batch, frames, height, width, _ = x.shape
                    x = doubled.reshape(batch, frames, height, width, 2, out_dim)
                    x = x.transpose(0, 1, 4, 2, 3, 5).reshape(batch, 2 * frames, height, width, out_dim)
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest-neighbour 2x
            # Wan2.1 halves the width here; Wan2.2 keeps it and adds the duplicating shortcut.
            x = make.conv2d(f"{name}.resample.1", out_dim if cfg.is_residual else out_dim // 2)(x)
            if cfg.is_residual:
                x = x + duplicate_up(shortcut, out_dim, 2 if temporal else 1, 2, first_chunk)
        return make.head(x, cfg.out_channels)


class AutoencoderKLWan(_WanModule):
    """The encoder, decoder and their 1x1x1 quant convs. Use `encode_video` / `decode_video`."""

    @classmethod
    def from_config(cls, config: dict | WanVAEConfig, **kwargs) -> "AutoencoderKLWan":
        return cls(config if isinstance(config, WanVAEConfig) else WanVAEConfig.from_dict(config), **kwargs)

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        z_dim = self.config.z_dim
        self.encoder = WanEncoder3d(self.config, **kw)
        self.decoder = WanDecoder3d(self.config, **kw)
        self.quant_conv = CausalConv3d(2 * z_dim, (1, 1, 1), **kw)
        self.post_quant_conv = CausalConv3d(z_dim, (1, 1, 1), **kw)

    def encode_chunk(self, x, first_chunk: bool = False):
        """[B, F, H, W, 3] -> the posterior mean [B, F', h, w, z_dim] (the moments' first half)."""
        x = patchify(x, self.config.patch)
        return self.quant_conv(self.encoder(x, first_chunk))[..., : self.config.z_dim]

    def decode_chunk(self, z, first_chunk: bool = False):
        """[B, T, h, w, z_dim] -> frames [B, F, H, W, 3] clipped to [-1, 1]."""
        frames = unpatchify(self.decoder(self.post_quant_conv(z), first_chunk), self.config.patch)
        return jnp.clip(frames, -1.0, 1.0)

    def __call__(self, x):
        """One later-chunk encode and decode (initialises every parameter)."""
        return self.decode_chunk(self.encode_chunk(x))

    def init_input(self):
        """The smallest video chunk `init` accepts: [1, temporal_factor, s, s, pixel_channels]."""
        size = self.config.spatial_factor
        return jnp.zeros((1, self.config.temporal_factor, size, size, self.config.pixel_channels), self.dtype)


def _chunked(module, params, method: str, x, chunk_frames: int, out_frames: int):
    """x [B, C, F, H, W], F = 1 + chunk_frames * n: `method` on frame 0 alone (first_chunk), then
    `lax.scan` over the n chunks (each giving out_frames frames) carrying the causal cache. Each
    chunk is sliced from x and its output written into the result [B, C', 1 + out_frames * n,
    H', W'] in place, so the working memory is one chunk's, whatever F is."""

    def chunk_at(start, size):  # cast per chunk: no converted copy of the whole input
        return jnp.moveaxis(jax.lax.dynamic_slice_in_dim(x, start, size, axis=2), 1, -1).astype(module.dtype)

    first, cache = module.apply({"params": params}, chunk_at(0, 1), True, method=method, mutable=["cache"])
    first = jnp.moveaxis(first, -1, 1)
    chunks = (x.shape[2] - 1) // chunk_frames
    if chunks == 0:
        return first

    batch, channels, _, height, width = first.shape
    result = jnp.zeros((batch, channels, 1 + chunks * out_frames, height, width), first.dtype)
    result = jax.lax.dynamic_update_slice_in_dim(result, first, 0, axis=2)

    def step(carry, _):
        index, cache, result = carry
        out, cache = module.apply({"params": params, **cache}, chunk_at(1 + index * chunk_frames, chunk_frames),
                                  method=method, mutable=["cache"])
        result = jax.lax.dynamic_update_slice_in_dim(result, jnp.moveaxis(out, -1, 1), 1 + index * out_frames, axis=2)
        return (index + 1, cache, result), None

    (_, _, result), _ = jax.lax.scan(step, (jnp.int32(0), cache, result), length=chunks)
    return result


def encode_video(module: AutoencoderKLWan, params, x):
    """Video [B, 3, F, H, W] in [-1, 1], F = 1 + temporal_factor * k -> posterior mean
    [B, z_dim, 1 + k, H / s, W / s], s = spatial_factor (diffusers' `encode(x).latent_dist.mean`, before the
    pipeline's latents_mean / latents_std normalisation)."""
    cfg = module.config
    if x.ndim != 5 or (x.shape[2] - 1) % cfg.temporal_factor:
        raise ValueError(f"x: expected [B, 3, 1 + {cfg.temporal_factor} * k, H, W] frames, got shape {x.shape}")
    if x.shape[3] % cfg.spatial_factor or x.shape[4] % cfg.spatial_factor:
        raise ValueError(f"x: height and width must be multiples of {cfg.spatial_factor}, got {x.shape[3:]}")
    return _chunked(module, params, "encode_chunk", x, cfg.temporal_factor, 1)


def decode_video(module: AutoencoderKLWan, params, z):
    """Latents [B, z_dim, T, h, w] (already un-normalised: what diffusers' `decode` receives)
    -> video [B, 3, 1 + temporal_factor * (T - 1), s h, s w] clipped to [-1, 1], in module.dtype.
    One latent frame per chunk, as diffusers decodes."""
    if z.ndim != 5 or z.shape[1] != module.config.z_dim:
        raise ValueError(f"z: expected [B, {module.config.z_dim}, T, h, w] latents, got shape {z.shape}")
    return _chunked(module, params, "decode_chunk", z, 1, module.config.temporal_factor)
