"""Stable Diffusion 3 / 3.5 MM-DiT transformer (diffusers' SD3Transformer2DModel) in Flax.

Latents [B, C, H, W] are cut into p x p patches and embedded, a 2D sin-cos position table is
cropped to the latent size, and a stack of joint blocks updates a text stream and an image
stream that meet only inside the joint attention core. Every block modulates both streams
from `temb` = time embedding + pooled-text embedding (adaLN-Zero); the last block only feeds
the image side (`context_pre_only`: its text side has a continuous adaLN and no output).
SD3.5 adds RMS QK-norm (`qk_norm="rms_norm"`); SD3.5-Medium (MMDiT-X) adds, in the blocks
listed in `dual_attention_layers`, an image-only self-attention with its own modulation.

The blocks run under scan over parameters stacked along a leading layer axis, in up to three
parts (`SD3Transformer.layer_stacks`): the dual-attention blocks (SD3.5-Medium's first
layers) stacked in `dual_blocks`, the other uniform blocks in `blocks`, and the last block
(`context_pre_only`) alone as `blocks_{num_layers - 1}`: each part has its own weights' shapes.

Text and image stay separate tensors; the text stream may carry more rows than the image
stream (models/layers.py batch convention), so per-row conditioning is explicit: text row j
is modulated by temb(pooled row j, timestep of its image row), the image stream by the first
B rows of temb.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from models.layers import (
    AdaLNModulation,
    GELUFeedForward,
    JointAttentionCore,
    LayerStack,
    MLPEmbedder,
    QKVProjection,
    ScannedBlock,
    SelfAttentionCore,
    layer_norm,
    modulate,
    scan_blocks,
    timestep_embedding,
)

_EPS = 1e-6
_TIME_CHANNELS = 256


def sincos_position_table(embed_dim: int, grid_size: int, base_size: int) -> np.ndarray:
    """diffusers' 2D sin-cos table [grid_size**2, embed_dim] (float64 math, float32 result).

    Positions are arange(grid_size) * base_size / grid_size; the first half of the channels
    encodes the column, the second half the row; each half is [sin, cos] of position x
    10000**(-i / (embed_dim / 4)).
    """
    if embed_dim % 4:
        raise ValueError(f"the patch embedding width must be divisible by 4, got {embed_dim}")
    positions = np.arange(grid_size, dtype=np.float64) / (grid_size / base_size)
    freqs = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4))

    def encode(coords):
        angles = coords.reshape(-1)[:, None] * freqs[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.meshgrid(positions, positions, indexing="ij")
    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


class JointBlock(ScannedBlock):
    """One MM-DiT block: adaLN-Zero on both streams, joint attention, gated MLPs; carries (img, txt)."""

    dim: int
    heads: int
    qk_norm: bool
    context_pre_only: bool
    dual_attention: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _dense(self, features, name):
        return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def _projection(self, name):
        head_dim = self.dim // self.heads
        return QKVProjection(self.heads, head_dim, self.qk_norm, _EPS, self.dtype, self.param_dtype, name=name)

    def _ff(self, name):
        return GELUFeedForward(dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def _modulation(self, chunks, name):
        return AdaLNModulation(self.dim, chunks, self.dtype, self.param_dtype, name=name)

    @nn.compact
    def __call__(self, carry, layer, img_temb, txt_temb):
        img, txt = carry
        img_chunks = 9 if self.dual_attention else 6
        img_mod = self._modulation(img_chunks, "img_mod")(img_temb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = img_mod[:6]
        img_normed = layer_norm(img)

        if self.context_pre_only:  # continuous adaLN: (scale, shift), no gates, no text output
            txt_scale, txt_shift = self._modulation(2, "txt_mod")(txt_temb)
            txt_in = modulate(layer_norm(txt), txt_shift, txt_scale)
        else:
            txt_mod = self._modulation(6, "txt_mod")(txt_temb)
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = txt_mod
            txt_in = modulate(layer_norm(txt), c_shift_msa, c_scale_msa)

        txt_q, txt_k, txt_v = self._projection("txt_qkv")(txt_in)
        img_q, img_k, img_v = self._projection("img_qkv")(modulate(img_normed, shift_msa, scale_msa))
        txt_attn, img_attn = JointAttentionCore(name="attn")(txt_q, txt_k, txt_v, img_q, img_k, img_v)
        img = img + gate_msa[:, None] * self._dense(self.dim, "img_attn_out")(img_attn)

        if self.dual_attention:  # MMDiT-X: image-only self-attention, own shift/scale/gate
            shift_msa2, scale_msa2, gate_msa2 = img_mod[6:]
            q, k, v = self._projection("img_qkv2")(modulate(img_normed, shift_msa2, scale_msa2))
            attn2 = SelfAttentionCore(name="attn2")(q, k, v)
            img = img + gate_msa2[:, None] * self._dense(self.dim, "img_attn2_out")(attn2)

        img_ff = self._ff("img_ff")(modulate(layer_norm(img), shift_mlp, scale_mlp))
        img = img + gate_mlp[:, None] * img_ff
        if self.context_pre_only:
            return (img, None), None

        txt = txt + c_gate_msa[:, None] * self._dense(self.dim, "txt_attn_out")(txt_attn)
        txt_ff = self._ff("txt_ff")(modulate(layer_norm(txt), c_shift_mlp, c_scale_mlp))
        return (img, txt + c_gate_mlp[:, None] * txt_ff), None


class SD3Transformer(nn.Module):
    """SD3Transformer2DModel: (latents NCHW, text, pooled text, timestep) -> prediction NCHW."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @classmethod
    def from_config(cls, config: dict, dtype=jnp.float32, param_dtype=jnp.float32) -> "SD3Transformer":
        """Build from diffusers' transformer/config.json (unknown keys are ignored)."""
        qk_norm = config.get("qk_norm")
        if qk_norm not in (None, "rms_norm"):
            raise ValueError(f"SD3 transformer config: qk_norm must be null or 'rms_norm', got {qk_norm!r}")
        if config.get("pos_embed_max_size") is None:
            raise ValueError("SD3 transformer config: pos_embed_max_size must be set (every SD3/SD3.5 model sets it)")
        inner = config.get("num_attention_heads", 18) * config.get("attention_head_dim", 64)
        caption_dim = config.get("caption_projection_dim", inner)
        if caption_dim != inner:
            raise ValueError(
                f"SD3 transformer config: caption_projection_dim ({caption_dim}) must equal "
                f"num_attention_heads * attention_head_dim ({inner}), as in every released model"
            )
        fields = {f: config[f] for f in cls.__dataclass_fields__ if f in config and f not in ("dtype", "param_dtype")}
        fields["dual_attention_layers"] = tuple(config.get("dual_attention_layers") or ())
        if fields.get("out_channels") is None:
            fields["out_channels"] = config.get("in_channels", cls.in_channels)
        return cls(**fields, dtype=dtype, param_dtype=param_dtype)

    @property
    def layer_stacks(self) -> tuple[LayerStack, ...]:
        """The stacked runs of layers (each under one scan): the dual-attention blocks, then the
        other blocks but the last; the last block (context_pre_only) is not stacked."""
        dual = len(self.dual_attention_layers)
        if tuple(self.dual_attention_layers) != tuple(range(dual)) or dual >= self.num_layers:
            raise ValueError(
                "SD3 transformer: dual_attention_layers must be the first layers before the last one "
                f"(0, 1, ..., n - 1 with n < num_layers = {self.num_layers}, as in SD3.5-Medium), "
                f"got {list(self.dual_attention_layers)}"
            )
        return LayerStack("dual_blocks", range(dual), "blocks"), LayerStack("blocks", range(dual, self.num_layers - 1), "blocks")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def _dense(self, features, name):
        return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def _patch_embed(self, latents):
        """NCHW latents -> [B, (H/p)(W/p), D] tokens plus the centre crop of the position table."""
        height, width = latents.shape[-2] // self.patch_size, latents.shape[-1] // self.patch_size
        patches = nn.Conv(
            self.inner_dim,
            (self.patch_size, self.patch_size),
            strides=self.patch_size,
            padding="VALID",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="patch_embed",
        )(jnp.transpose(latents, (0, 2, 3, 1)).astype(self.dtype))
        grid = self.pos_embed_max_size
        table = self.param(
            "pos_embed",
            lambda _key: jnp.asarray(
                sincos_position_table(self.inner_dim, grid, self.sample_size // self.patch_size)[None],
                self.param_dtype,
            ),
        )
        top, left = (grid - height) // 2, (grid - width) // 2
        crop = table.reshape(grid, grid, -1)[top : top + height, left : left + width]
        tokens = patches.reshape(patches.shape[0], height * width, -1)
        return (tokens + crop.reshape(1, height * width, -1)).astype(self.dtype)

    def _temb(self, timestep, pooled, image_of_row):
        """Time + pooled-text embedding per pooled row; each row takes its image row's timestep."""
        t_freq = timestep_embedding(timestep[image_of_row], _TIME_CHANNELS, flip_sin_to_cos=True, freq_shift=0.0)
        embedder = lambda name: MLPEmbedder(self.inner_dim, self.dtype, self.param_dtype, name=name)  # noqa: E731
        return embedder("time_embedder")(t_freq.astype(self.dtype)) + embedder("pooled_embedder")(pooled)

    def _check_inputs(self, hidden_states, encoder_hidden_states, pooled_projections):
        rows, channels, height, width = hidden_states.shape
        if channels != self.in_channels:
            raise ValueError(f"hidden_states has {channels} channels, the model expects {self.in_channels}")
        for name, size in (("height", height), ("width", width)):
            if size % self.patch_size or size // self.patch_size > self.pos_embed_max_size:
                raise ValueError(
                    f"hidden_states {name} {size} must be a multiple of patch_size {self.patch_size} and at most "
                    f"patch_size * pos_embed_max_size = {self.patch_size * self.pos_embed_max_size}"
                )
        text_rows = encoder_hidden_states.shape[0]
        if text_rows < rows or pooled_projections.shape[0] != text_rows:
            raise ValueError(
                f"encoder_hidden_states ({text_rows} rows) and pooled_projections "
                f"({pooled_projections.shape[0]} rows) must have the same number of rows, at least the "
                f"{rows} rows of hidden_states"
            )

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        """hidden_states [B, C, H, W]; encoder_hidden_states [Bt, T, joint_attention_dim];
        pooled_projections [Bt, pooled_projection_dim]; timestep [B] or scalar on diffusers'
        scale (1000 * sigma). Returns [B, out_channels, H, W]."""
        self._check_inputs(hidden_states, encoder_hidden_states, pooled_projections)
        rows, _, height, width = hidden_states.shape
        extra = encoder_hidden_states.shape[0] - rows
        image_of_text_row = np.concatenate([np.arange(rows), np.arange(rows - extra, rows)])
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (rows,))

        img = self._patch_embed(hidden_states)
        txt_temb = self._temb(timestep, pooled_projections.astype(self.dtype), image_of_text_row)
        img_temb = txt_temb[:rows]
        txt = self._dense(self.inner_dim, "context_embedder")(encoder_hidden_states.astype(self.dtype))

        block = dict(dim=self.inner_dim, heads=self.num_attention_heads, qk_norm=self.qk_norm == "rms_norm",
                     dtype=self.dtype, param_dtype=self.param_dtype)
        carry = (img, txt)
        for stack in self.layer_stacks:
            dual = stack.path == "dual_blocks"
            carry = scan_blocks(JointBlock, stack, carry, img_temb, txt_temb, context_pre_only=False,
                                dual_attention=dual, **block)
        last = self.num_layers - 1
        (img, _), _ = JointBlock(context_pre_only=True, dual_attention=False, name=f"blocks_{last}", **block)(
            carry, last, img_temb, txt_temb
        )

        scale, shift = AdaLNModulation(self.inner_dim, 2, self.dtype, self.param_dtype, name="norm_out")(img_temb)
        img = self._dense(self.patch_size**2 * self.out_channels, "proj_out")(
            modulate(layer_norm(img), shift, scale)
        )
        p, h, w = self.patch_size, height // self.patch_size, width // self.patch_size
        img = img.reshape(rows, h, w, p, p, self.out_channels)
        return jnp.einsum("nhwpqc->nchpwq", img).reshape(rows, self.out_channels, h * p, w * p)
