"""The conditional UNet of Stable Diffusion 1.x/2.x and SDXL (diffusers' UNet2DConditionModel).

One module covers the SD1.5, SD2.x and SDXL layouts and the few-step SDXL descendants
(LCM-style `time_cond_proj_dim`); the differences are data in `UNetConfig`, built from the
diffusers `unet/config.json` dict by `UNetConfig.from_diffusers`.

Reading the diffusers config: its `attention_head_dim` is, for historical reasons, the number
of heads (diffusers passes it as `num_attention_heads`; the head size is channels // heads).
A conv 1x1 `proj_in`/`proj_out` (SD1.5) and a linear one (SD2, SDXL) compute the same
thing, so both are a Dense here; the converter reshapes the conv kernel.

Cross-attention keys/values are computed for every context row; the context may carry more
rows than the image (NAG negatives, see models/layers.py), which only the attention core
looks at. Everything is static-shape and jit-friendly. Image tensors are NCHW at the
boundary (diffusers' layout), NHWC inside.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from models.layers import CrossAttentionCore, SelfAttentionCore, timestep_embedding

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)

# Config keys whose non-default values select architectures this module does not implement.
_UNSUPPORTED_UNLESS = {
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}


def _per_block(value, blocks: int, name: str) -> tuple:
    """diffusers accepts one value for all down blocks or one per block."""
    if isinstance(value, (list, tuple)):
        if len(value) != blocks:
            raise ValueError(f"UNet config: {name} has {len(value)} entries for {blocks} down blocks")
        if any(isinstance(v, (list, tuple)) for v in value):
            raise ValueError(f"UNet config: nested per-layer {name} {value!r} is not supported")
        return tuple(value)
    return (value,) * blocks


def _one_cross_attention_dim(value) -> int:
    """Every block attends to the same encoder_hidden_states, so one width for all."""
    widths = set(value) if isinstance(value, (list, tuple)) else {value}
    if len(widths) != 1:
        raise ValueError(f"UNet config: cross_attention_dim {value!r} differing per block is not supported")
    return int(widths.pop())


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The diffusers config resolved to per-down-block tuples (up blocks use them reversed)."""

    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: tuple = (2, 2, 2, 2)
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: tuple = (1, 1, 1, 1)
    heads: tuple = (8, 8, 8, 8)
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> "UNetConfig":
        """From a diffusers `unet/config.json` dict; diffusers' defaults fill missing keys."""
        for key, allowed in _UNSUPPORTED_UNLESS.items():
            value = config.get(key, allowed)
            off = not any(value) if isinstance(value, (list, tuple)) else not value  # False, None, [False, ...]
            if value != allowed and not (allowed in (False, None) and off):
                raise ValueError(f"UNet config: {key}={value!r} is not supported (only {allowed!r})")
        if config.get("act_fn", "silu") not in ("silu", "swish"):
            raise ValueError(f"UNet config: act_fn={config['act_fn']!r} is not supported (only 'silu')")
        if config.get("norm_num_groups", 32) is None:
            raise ValueError("UNet config: norm_num_groups=None is not supported")
        defaults = cls()
        down = tuple(config.get("down_block_types", defaults.down_block_types))
        up = tuple(config.get("up_block_types", defaults.up_block_types))
        mid = config.get("mid_block_type", defaults.mid_block_type)
        for name, types, allowed in (("down_block_types", down, DOWN_BLOCKS), ("up_block_types", up, UP_BLOCKS)):
            for block in types:
                if block not in allowed:
                    raise ValueError(f"UNet config: {name} entry {block!r} is not supported (only {allowed})")
        if mid not in MID_BLOCKS:
            raise ValueError(f"UNet config: mid_block_type={mid!r} is not supported (only {MID_BLOCKS})")
        channels = tuple(config.get("block_out_channels", defaults.block_out_channels))
        if not len(down) == len(up) == len(channels):
            raise ValueError(
                f"UNet config: {len(down)} down blocks, {len(up)} up blocks and {len(channels)} "
                "block_out_channels must agree"
            )
        addition = config.get("addition_embed_type")
        if addition not in (None, "text_time"):
            raise ValueError(f"UNet config: addition_embed_type={addition!r} is not supported (only 'text_time')")
        blocks = len(down)
        return cls(
            in_channels=config.get("in_channels", 4),
            out_channels=config.get("out_channels", 4),
            center_input_sample=bool(config.get("center_input_sample", False)),
            flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
            freq_shift=float(config.get("freq_shift", 0)),
            down_block_types=down,
            mid_block_type=mid,
            up_block_types=up,
            block_out_channels=channels,
            layers_per_block=_per_block(config.get("layers_per_block", 2), blocks, "layers_per_block"),
            downsample_padding=int(config.get("downsample_padding", 1)),
            mid_block_scale_factor=float(config.get("mid_block_scale_factor", 1)),
            norm_num_groups=int(config.get("norm_num_groups", 32)),
            norm_eps=float(config.get("norm_eps", 1e-5)),
            cross_attention_dim=_one_cross_attention_dim(config.get("cross_attention_dim", 1280)),
            transformer_layers_per_block=_per_block(
                config.get("transformer_layers_per_block", 1), blocks, "transformer_layers_per_block"
            ),
            heads=_per_block(config.get("attention_head_dim", 8), blocks, "attention_head_dim"),
            addition_embed_type=addition,
            addition_time_embed_dim=config.get("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=config.get("projection_class_embeddings_input_dim"),
            time_cond_proj_dim=config.get("time_cond_proj_dim"),
            conv_in_kernel=int(config.get("conv_in_kernel", 3)),
            conv_out_kernel=int(config.get("conv_out_kernel", 3)),
        )


class _Layers:
    """Dense/Conv/norm constructors sharing a module's dtype and param_dtype."""

    def __init__(self, module):
        self.kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)

    def dense(self, features, name, use_bias=True):
        return nn.Dense(features, use_bias=use_bias, name=name, **self.kw)

    def conv(self, features, kernel, name, strides=1, padding=None):
        pad = (kernel - 1) // 2 if padding is None else padding
        pad = pad if isinstance(pad, tuple) else ((pad, pad), (pad, pad))
        return nn.Conv(features, (kernel, kernel), strides=strides, padding=pad, name=name, **self.kw)

    def group_norm(self, groups, eps, name):
        return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, name=name, **self.kw)

    def layer_norm(self, name, eps=1e-5):
        return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name, **self.kw)


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2, with the optional LCM guidance projection added first."""

    features: int
    cond_proj_dim: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, condition=None):
        make = _Layers(self)
        if self.cond_proj_dim is None and condition is not None:
            raise ValueError("timestep_cond was given, but this UNet has no time_cond_proj_dim (not an LCM-style UNet)")
        if self.cond_proj_dim is not None:
            cond_proj = make.dense(x.shape[-1], "cond_proj", use_bias=False)
            if condition is not None:
                x = x + cond_proj(condition.astype(self.dtype))
            elif self.is_initializing():  # the parameter exists even when a call omits the condition
                cond_proj(jnp.zeros((1, self.cond_proj_dim), self.dtype))
        x = make.dense(self.features, "linear_1")(x)
        return make.dense(self.features, "linear_2")(nn.silu(x))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between, 1x1 shortcut if needed."""

    out_channels: int
    groups: int
    eps: float
    output_scale: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        make = _Layers(self)
        h = make.conv(self.out_channels, 3, "conv1")(nn.silu(make.group_norm(self.groups, self.eps, "norm1")(x)))
        h = h + make.dense(self.out_channels, "time_emb_proj")(nn.silu(temb))[:, None, None, :]
        h = make.conv(self.out_channels, 3, "conv2")(nn.silu(make.group_norm(self.groups, self.eps, "norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = make.conv(self.out_channels, 1, "conv_shortcut")(x)
        return (x + h) / self.output_scale


class Attention(nn.Module):
    """Projections around an attention core: self-attention (attn1) or cross (attn2)."""

    heads: int
    head_dim: int
    cross: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        make = _Layers(self)
        inner = self.heads * self.head_dim
        source = context if self.cross else x

        def project(name, y):
            return make.dense(inner, name, use_bias=False)(y).reshape(*y.shape[:2], self.heads, self.head_dim)

        q, k, v = project("to_q", x), project("to_k", source), project("to_v", source)
        core = CrossAttentionCore(name="core") if self.cross else SelfAttentionCore(name="core")
        return make.dense(x.shape[-1], "to_out_0")(core(q, k, v))


class TransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock: pre-LayerNorm self-attn, cross-attn, GEGLU MLP."""

    heads: int
    head_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        make = _Layers(self)
        attn = dict(heads=self.heads, head_dim=self.head_dim, dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + Attention(cross=False, name="attn1", **attn)(make.layer_norm("norm1")(x))
        x = x + Attention(cross=True, name="attn2", **attn)(make.layer_norm("norm2")(x), context)
        h = make.layer_norm("norm3")(x)
        hidden, gate = jnp.split(make.dense(8 * x.shape[-1], "ff_proj")(h), 2, axis=-1)
        return x + make.dense(x.shape[-1], "ff_out")(hidden * nn.gelu(gate, approximate=False))


class Transformer2D(nn.Module):
    """GroupNorm, proj_in, `depth` transformer blocks over the H*W tokens, proj_out, residual."""

    heads: int
    depth: int
    groups: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        make = _Layers(self)
        batch, height, width, channels = x.shape
        head_dim = channels // self.heads
        h = make.group_norm(self.groups, 1e-6, "norm")(x).reshape(batch, height * width, channels)
        h = make.dense(self.heads * head_dim, "proj_in")(h)
        for k in range(self.depth):
            h = TransformerBlock(self.heads, head_dim, self.dtype, self.param_dtype, name=f"transformer_blocks_{k}")(
                h, context
            )
        return make.dense(channels, "proj_out")(h).reshape(x.shape) + x


def _resize_nearest(x, size):
    """Nearest-neighbour resize of NHWC x to (H, W) = size, torch's index rule floor(i * in / out)."""
    for axis, out in zip((1, 2), size):
        if out == 2 * x.shape[axis]:
            x = jnp.repeat(x, 2, axis=axis)  # the usual case, without a gather
        else:
            index = np.floor(np.arange(out) * (x.shape[axis] / out)).astype(np.int32)
            x = jnp.take(x, index, axis=axis)
    return x


class UNet2DConditionModel(nn.Module):
    """diffusers' UNet2DConditionModel for the SD1.5 / SD2.x / SDXL configurations."""

    config: UNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, config: dict[str, Any], dtype=jnp.float32, param_dtype=jnp.float32):
        return cls(UNetConfig.from_diffusers(config), dtype=dtype, param_dtype=param_dtype)

    def _resnet(self, out_channels, name, output_scale=1.0):
        c = self.config
        return ResnetBlock(out_channels, c.norm_num_groups, c.norm_eps, output_scale, self.dtype, self.param_dtype,
                           name=name)

    def _transformer(self, heads, depth, name):
        return Transformer2D(heads, depth, self.config.norm_num_groups, self.dtype, self.param_dtype, name=name)

    def _time_embedding(self, timesteps, batch, timestep_cond, added_cond_kwargs):
        c = self.config
        timesteps = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (batch,))
        t = timestep_embedding(timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        features = 4 * c.block_out_channels[0]
        emb = TimestepEmbedding(features, c.time_cond_proj_dim, self.dtype, self.param_dtype, name="time_embedding")(
            t.astype(self.dtype), timestep_cond
        )
        if c.addition_embed_type == "text_time":
            added = added_cond_kwargs or {}
            if "text_embeds" not in added or "time_ids" not in added:
                raise ValueError("this UNet (addition_embed_type='text_time') needs added_cond_kwargs with "
                                 "'text_embeds' [B, D] and 'time_ids' [B, 6]")
            time_ids = jnp.asarray(added["time_ids"])
            time_embeds = timestep_embedding(
                time_ids.reshape(-1), c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift
            ).reshape(time_ids.shape[0], -1)
            add = jnp.concatenate([jnp.asarray(added["text_embeds"]).astype(jnp.float32), time_embeds], axis=-1)
            emb = emb + TimestepEmbedding(features, None, self.dtype, self.param_dtype, name="add_embedding")(
                add.astype(self.dtype)
            )
        return emb

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, timestep_cond=None, added_cond_kwargs=None):
        """sample [B, C, H, W], timesteps [B] or scalar, encoder_hidden_states [Bc, T, D] (Bc >= B
        only under NAG), timestep_cond [B, time_cond_proj_dim], added_cond_kwargs for SDXL:
        {'text_embeds': [B, D], 'time_ids': [B, 6]} -> [B, out_channels, H, W]."""
        c = self.config
        make = _Layers(self)
        x = jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype)
        if c.center_input_sample:
            x = 2 * x - 1.0
        context = encoder_hidden_states.astype(self.dtype)
        temb = self._time_embedding(timesteps, x.shape[0], timestep_cond, added_cond_kwargs)

        x = make.conv(c.block_out_channels[0], c.conv_in_kernel, "conv_in")(x)
        skips = [x]
        last = len(c.down_block_types) - 1
        for i, block in enumerate(c.down_block_types):
            for j in range(c.layers_per_block[i]):
                x = self._resnet(c.block_out_channels[i], f"down_blocks_{i}_resnets_{j}")(x, temb)
                if block == "CrossAttnDownBlock2D":
                    x = self._transformer(c.heads[i], c.transformer_layers_per_block[i],
                                          f"down_blocks_{i}_attentions_{j}")(x, context)
                skips.append(x)
            if i < last:
                pad = ((1, 1), (1, 1)) if c.downsample_padding else ((0, 1), (0, 1))
                x = make.conv(c.block_out_channels[i], 3, f"down_blocks_{i}_downsamplers_0", strides=2,
                              padding=pad)(x)
                skips.append(x)

        if c.mid_block_type is not None:
            scale = c.mid_block_scale_factor
            x = self._resnet(c.block_out_channels[-1], "mid_block_resnets_0", scale)(x, temb)
            x = self._transformer(c.heads[-1], c.transformer_layers_per_block[-1], "mid_block_attentions_0")(
                x, context
            )
            x = self._resnet(c.block_out_channels[-1], "mid_block_resnets_1", scale)(x, temb)

        for i, block in enumerate(c.up_block_types):
            down = last - i  # the down block this up block mirrors
            for j in range(c.layers_per_block[down] + 1):
                x = jnp.concatenate([x, skips.pop()], axis=-1)
                x = self._resnet(c.block_out_channels[down], f"up_blocks_{i}_resnets_{j}")(x, temb)
                if block == "CrossAttnUpBlock2D":
                    x = self._transformer(c.heads[down], c.transformer_layers_per_block[down],
                                          f"up_blocks_{i}_attentions_{j}")(x, context)
            if i < last:  # upsample to the next skip's size (exactly 2x unless H, W were odd)
                x = _resize_nearest(x, skips[-1].shape[1:3])
                x = make.conv(c.block_out_channels[down], 3, f"up_blocks_{i}_upsamplers_0")(x)

        x = nn.silu(make.group_norm(c.norm_num_groups, c.norm_eps, "conv_norm_out")(x))
        x = make.conv(c.out_channels, c.conv_out_kernel, "conv_out")(x)
        return jnp.transpose(x, (0, 3, 1, 2))
