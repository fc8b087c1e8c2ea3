"""The Flux transformer (FLUX.1 schnell and dev): diffusers' `FluxTransformer2DModel` in linen.

Reads like Black Forest Labs' `model.py`: embed the packed image tokens and the T5 tokens,
build one conditioning vector per row from timestep, (dev) guidance and the pooled CLIP
embedding, run the double-stream blocks (each stream with its own weights, joint attention),
then the single-stream blocks (one set of weights shared by both streams), then the final
adaLN and projection. Each kind of block runs under one scan over parameters stacked along a
leading layer axis (`models.layers.scan_blocks`), so compile time does not grow with depth.

Text and image stay separate tensors everywhere; they meet only inside `JointAttentionCore`.
Where the single-stream blocks apply one per-token layer to `[text; image]`, it is applied to
each part. The text stream may carry more rows than the image stream (the batch convention of
`models/layers.py`): text row j is conditioned on its own pooled embedding and on the
timestep and guidance of its image row, while the image stream uses the first rows.

Inputs follow diffusers exactly: `hidden_states` [B, N, in_channels] packed latents,
`encoder_hidden_states` [Bt, T, joint_attention_dim], `pooled_projections` [Bt, Dp],
`timestep` [B] as sigma in [0, 1] (the model multiplies by 1000, as diffusers' does),
`img_ids` [N, 3], `txt_ids` [T, 3], `guidance` [B] for dev models (also multiplied by 1000).
"""

from __future__ import annotations

from typing import Sequence

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
    apply_rope,
    layer_norm,
    modulate,
    rope_cos_sin,
    scan_blocks,
    timestep_embedding,
)

ROPE_THETA = 10000.0
MLP_RATIO = 4
DOUBLE_STACK, SINGLE_STACK = "transformer_blocks", "single_transformer_blocks"  # module names


def single_blocks_stack(num_single_layers: int) -> LayerStack:
    """The single blocks' parameters, stacked in `single_transformer_blocks/blocks`."""
    return LayerStack(f"{SINGLE_STACK}/blocks", range(num_single_layers), "blocks")


def image_row_of_text_rows(image_rows: int, text_rows: int) -> np.ndarray:
    """For each text row, the image row it belongs to: the first image_rows in order, then the
    extra rows paired with the last image rows (models/layers.py batch convention)."""
    extra = text_rows - image_rows
    if not 0 <= extra <= image_rows:
        raise ValueError(
            f"encoder_hidden_states has {text_rows} rows for {image_rows} image rows; expected between "
            f"{image_rows} and {2 * image_rows} (extra rows are negative prompts for the last image rows)"
        )
    return np.concatenate([np.arange(image_rows), np.arange(image_rows - extra, image_rows)])


def _rotated_qkv(projection, x, rope):
    """Per-head q, k, v of one stream with QK-norm, RoPE applied to q and k."""
    q, k, v = projection(x)
    cos, sin = rope
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class _FluxBlock(ScannedBlock):
    """The fields of every Flux block; blocks run under `scan_blocks`, carrying (txt, img)."""

    heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32


class FluxDoubleBlock(_FluxBlock):
    """Double-stream block: own modulation, projections and MLP per stream, joint attention."""

    def modulations(self, temb, layer, image_rows):
        """(image, text) adaLN vectors (shift, scale, gate, shift_mlp, scale_mlp, gate_mlp) of this
        layer, from each stream's own Dense of temb (Chroma's blocks read them from a table instead)."""
        dim, kw = self.heads * self.head_dim, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return (AdaLNModulation(dim, 6, name="norm1", **kw)(temb[:image_rows]),
                AdaLNModulation(dim, 6, name="norm1_context", **kw)(temb))

    @nn.compact
    def __call__(self, carry, layer, temb, txt_rope, img_rope, txt_mask=None):
        txt, img = carry
        dim = self.heads * self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        img_mod, txt_mod = self.modulations(temb, layer, img.shape[0])
        attention_inputs = []
        for x, (shift, scale, *_), rope, name in ((txt, txt_mod, txt_rope, "attn_context"), (img, img_mod, img_rope, "attn")):
            projection = QKVProjection(self.heads, self.head_dim, name=name, **kw)
            attention_inputs += _rotated_qkv(projection, modulate(layer_norm(x), shift, scale), rope)
        txt_attn, img_attn = JointAttentionCore(name="core")(*attention_inputs, txt_mask=txt_mask)
        img = _gated_attention_and_mlp(img, img_attn, img_mod, nn.Dense(dim, name="to_out", **kw), GELUFeedForward(name="ff", **kw))
        txt = _gated_attention_and_mlp(
            txt, txt_attn, txt_mod, nn.Dense(dim, name="to_add_out", **kw), GELUFeedForward(name="ff_context", **kw)
        )
        return (_clip_float16(txt), _clip_float16(img)), None


def _gated_attention_and_mlp(x, attn, modulation, out_proj, feed_forward):
    _, _, gate_attn, shift_mlp, scale_mlp, gate_mlp = modulation
    x = x + gate_attn[:, None, :] * out_proj(attn)
    return x + gate_mlp[:, None, :] * feed_forward(modulate(layer_norm(x), shift_mlp, scale_mlp))


def _clip_float16(x):
    """float16 overflows in these residual streams; diffusers clips to the finite range."""
    return jnp.clip(x, -65504, 65504) if x.dtype == jnp.float16 else x


class FluxSingleBlock(_FluxBlock):
    """Single-stream block: attention and MLP in parallel from one modulated input, with weights
    shared by both streams (applied to text and image separately)."""

    def modulations(self, temb, layer, image_rows):
        """(text, image) adaLN vectors (shift, scale, gate) of this layer: one Dense of temb shared
        by both streams (Chroma's blocks read them from a table instead)."""
        modulation = AdaLNModulation(self.heads * self.head_dim, 3, name="norm", dtype=self.dtype,
                                     param_dtype=self.param_dtype)
        return modulation(temb), modulation(temb[:image_rows])

    @nn.compact
    def __call__(self, carry, layer, temb, txt_rope, img_rope, txt_mask=None):
        txt, img = carry
        dim = self.heads * self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        txt_mod, img_mod = self.modulations(temb, layer, img.shape[0])
        qkv = QKVProjection(self.heads, self.head_dim, name="attn", **kw)
        proj_mlp = nn.Dense(MLP_RATIO * dim, name="proj_mlp", **kw)
        proj_out = nn.Dense(dim, name="proj_out", **kw)

        streams = []
        for x, (shift, scale, gate), rope in ((txt, txt_mod, txt_rope), (img, img_mod, img_rope)):
            normed = modulate(layer_norm(x), shift, scale)
            streams.append((x, gate, _rotated_qkv(qkv, normed, rope), nn.gelu(proj_mlp(normed), approximate=True)))
        (txt, txt_gate, txt_qkv, txt_mlp), (img, img_gate, img_qkv, img_mlp) = streams
        txt_attn, img_attn = JointAttentionCore(name="core")(*txt_qkv, *img_qkv, txt_mask=txt_mask)
        txt = txt + txt_gate[:, None, :] * proj_out(jnp.concatenate([txt_attn, txt_mlp], axis=-1))
        img = img + img_gate[:, None, :] * proj_out(jnp.concatenate([img_attn, img_mlp], axis=-1))
        return (_clip_float16(txt), _clip_float16(img)), None


class FluxSingleStreamBlocks(nn.Module):
    """All single-stream blocks as one module: the unit NAG's `reference` mode intercepts
    (nag_jax/flux_modes.py), because it changes how the image rows flow through the whole stack.
    The blocks run under scan, parameters stacked in `blocks` (`FluxTransformer2DModel.layer_stacks`)."""

    num_layers: int
    heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    block: type = FluxSingleBlock  # Chroma's subclass (models/chroma.py) reads its modulation from a table

    @nn.compact
    def __call__(self, txt, img, temb, txt_rope, img_rope, txt_mask=None):
        block = dict(heads=self.heads, head_dim=self.head_dim, dtype=self.dtype, param_dtype=self.param_dtype)
        return scan_blocks(self.block, single_blocks_stack(self.num_layers), (txt, img), temb, txt_rope, img_rope,
                           txt_mask, **block)


class FluxTimeTextEmbedding(nn.Module):
    """temb = MLP(sinusoid(1000 t)) [+ MLP(sinusoid(1000 g))] + MLP(pooled text), one row per input row
    (diffusers' CombinedTimestep[Guidance]TextProjEmbeddings)."""

    dim: int
    guidance_embeds: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep, guidance, pooled):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        sinusoid = lambda t: timestep_embedding(t, 256, flip_sin_to_cos=True, freq_shift=0.0).astype(self.dtype)  # noqa: E731
        emb = MLPEmbedder(self.dim, name="timestep_embedder", **kw)(sinusoid(timestep))
        if self.guidance_embeds:
            emb = emb + MLPEmbedder(self.dim, name="guidance_embedder", **kw)(sinusoid(guidance))
        return emb + MLPEmbedder(self.dim, name="text_embedder", **kw)(pooled)


class FluxTransformer2DModel(nn.Module):
    """Fields are diffusers' `transformer/config.json` keys; see `from_config`."""

    in_channels: int = 64
    out_channels: int | None = None
    patch_size: int = 1
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: Sequence[int] = (16, 56, 56)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @classmethod
    def from_config(cls, config: dict, dtype=jnp.float32, param_dtype=jnp.float32) -> "FluxTransformer2DModel":
        """Build from a diffusers `transformer/config.json` dict; keys the model does not use are ignored."""
        not_config = ("dtype", "param_dtype", "parent", "name")
        fields = {k: config[k] for k in cls.__dataclass_fields__ if k in config and k not in not_config}
        if "axes_dims_rope" in fields:
            fields["axes_dims_rope"] = tuple(fields["axes_dims_rope"])
        model = cls(**fields, dtype=dtype, param_dtype=param_dtype)
        if sum(model.axes_dims_rope) != model.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {model.axes_dims_rope} must sum to attention_head_dim ({model.attention_head_dim})"
            )
        return model

    @property
    def layer_stacks(self) -> tuple[LayerStack, ...]:
        """The stacked runs of layers: all double blocks, all single blocks (each under one scan)."""
        return LayerStack(DOUBLE_STACK, range(self.num_layers), DOUBLE_STACK), single_blocks_stack(self.num_single_layers)

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance=None):
        """Velocity [B, N, out_channels] for packed latents; inputs as in the module docstring.
        `guidance` is required by dev models (guidance_embeds) and ignored by the others."""
        rows, text_rows = hidden_states.shape[0], encoder_hidden_states.shape[0]
        if pooled_projections.shape[0] != text_rows:
            raise ValueError(
                f"pooled_projections has {pooled_projections.shape[0]} rows, encoder_hidden_states {text_rows}; "
                "they must match (one pooled embedding per prompt)"
            )
        if self.guidance_embeds and guidance is None:
            raise ValueError("guidance is required: this Flux model has guidance_embeds=True (a dev model)")
        owner = image_row_of_text_rows(rows, text_rows)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = self.num_attention_heads * self.attention_head_dim
        per_row = lambda v: jnp.broadcast_to(jnp.asarray(v, self.dtype) * 1000, (rows,))[owner]  # noqa: E731

        img = nn.Dense(dim, name="x_embedder", **kw)(hidden_states.astype(self.dtype))
        txt = nn.Dense(dim, name="context_embedder", **kw)(encoder_hidden_states.astype(self.dtype))
        temb = FluxTimeTextEmbedding(dim, self.guidance_embeds, name="time_text_embed", **kw)(
            per_row(timestep), per_row(guidance) if self.guidance_embeds else None, pooled_projections.astype(self.dtype)
        )
        txt_rope = rope_cos_sin(txt_ids, self.axes_dims_rope, ROPE_THETA)
        img_rope = rope_cos_sin(img_ids, self.axes_dims_rope, ROPE_THETA)

        heads = dict(heads=self.num_attention_heads, head_dim=self.attention_head_dim)
        double, _ = self.layer_stacks
        txt, img = scan_blocks(FluxDoubleBlock, double, (txt, img), temb, txt_rope, img_rope, **heads, **kw)
        _, img = FluxSingleStreamBlocks(self.num_single_layers, **heads, name=SINGLE_STACK, **kw)(
            txt, img, temb, txt_rope, img_rope
        )

        scale, shift = AdaLNModulation(dim, 2, name="norm_out", **kw)(temb[:rows])
        out_channels = self.patch_size**2 * (self.out_channels or self.in_channels)
        return nn.Dense(out_channels, name="proj_out", **kw)(modulate(layer_norm(img), shift, scale))
