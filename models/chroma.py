"""The Chroma transformer (lodestones/Chroma1-HD): diffusers' `ChromaTransformer2DModel` in linen.

Flux's blocks with three changes (models/flux.py supplies everything else):
- no pooled text or guidance input: every adaLN vector of the network (3 per single block, 6
  image and 6 text per double block, 2 for the final norm) comes from the "distilled guidance
  approximator", an MLP applied to [sinusoid(1000 t), sinusoid(0), sinusoid(1000 k)] for each
  vector index k, so it depends on the timestep alone; the blocks read their rows of that table;
- T5 is the only text encoder, and its padding is masked in every joint attention except the
  first padding token (`attention_mask` [Bt, T], 1 = attend), as the official Chroma code does;
- the final adaLN's two vectors are (shift, scale), not Flux's (scale, shift).

Batch convention as Flux: the text stream may carry more rows than the image stream (negative
prompts of the last image rows). Text row j reads the table row of its image row, so a negative
text row is modulated exactly as the positive one (the modulation has no text in it).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.flux import (
    ROPE_THETA,
    FluxDoubleBlock,
    FluxSingleBlock,
    FluxSingleStreamBlocks,
    FluxTransformer2DModel,
    image_row_of_text_rows,
)
from models.layers import MLPEmbedder, RMSNorm, layer_norm, modulate, rope_cos_sin, scan_blocks, timestep_embedding

DOUBLE_VECTORS, SINGLE_VECTORS, FINAL_VECTORS = 6, 3, 2


def _table_rows(table, start, count: int):
    """`count` adaLN vectors [B, D] from row `start` (traced: the scanned layer index) of the table."""
    block = jax.lax.dynamic_slice_in_dim(table, start, count, axis=1)
    return [block[:, i] for i in range(count)]


class ChromaDoubleBlock(FluxDoubleBlock):
    """Flux's double block, its image and text modulation read at `image_offset` / `text_offset`
    + 6 * layer of the approximator's table."""

    image_offset: int = 0
    text_offset: int = 0

    def modulations(self, table, layer, image_rows):
        return (_table_rows(table[:image_rows], self.image_offset + DOUBLE_VECTORS * layer, DOUBLE_VECTORS),
                _table_rows(table, self.text_offset + DOUBLE_VECTORS * layer, DOUBLE_VECTORS))


class ChromaSingleBlock(FluxSingleBlock):
    """Flux's single block, its modulation read at 3 * layer of the approximator's table."""

    def modulations(self, table, layer, image_rows):
        text = _table_rows(table, SINGLE_VECTORS * layer, SINGLE_VECTORS)
        return text, [v[:image_rows] for v in text]


class ChromaApproximator(nn.Module):
    """The adaLN table [B, vectors, dim] from the timestep (diffusers' ChromaCombinedTimestepTextProjEmbeddings
    then ChromaApproximator: in_proj, `layers` residual RMSNorm -> MLP blocks, out_proj)."""

    vectors: int
    dim: int
    num_channels: int = 64
    hidden_dim: int = 5120
    layers: int = 5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep):
        sinusoid = lambda t, size: timestep_embedding(t, size, flip_sin_to_cos=True, freq_shift=0.0)  # noqa: E731
        quarter = self.num_channels // 4
        rows = timestep.shape[0]
        time_and_guidance = jnp.concatenate([sinusoid(timestep, quarter), sinusoid(jnp.zeros((rows,)), quarter)], -1)
        index = sinusoid(jnp.arange(self.vectors, dtype=jnp.float32) * 1000, 2 * quarter)
        x = jnp.concatenate([jnp.broadcast_to(time_and_guidance[:, None], (rows, self.vectors, 2 * quarter)),
                             jnp.broadcast_to(index[None], (rows, self.vectors, 2 * quarter))], -1).astype(self.dtype)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(self.hidden_dim, name="in_proj", **kw)(x)
        eps = float(jnp.finfo(self.dtype).eps)  # torch.nn.RMSNorm's default: the input dtype's epsilon
        for i in range(self.layers):
            x = x + MLPEmbedder(self.hidden_dim, name=f"layers_{i}", **kw)(
                RMSNorm(eps, param_dtype=self.param_dtype, name=f"norms_{i}")(x))
        return nn.Dense(self.dim, name="out_proj", **kw)(x)


class ChromaTransformer2DModel(FluxTransformer2DModel):
    """Fields are diffusers' `transformer/config.json` keys (`from_config`, the parameter layout
    `layer_stacks` and the Flux fields are FluxTransformer2DModel's; Chroma uses neither
    `pooled_projection_dim` nor `guidance_embeds`)."""

    approximator_num_channels: int = 64
    approximator_hidden_dim: int = 5120
    approximator_layers: int = 5

    @property
    def table_size(self) -> int:
        """adaLN vectors in the approximator's table: singles first, then double image, double text, final."""
        return SINGLE_VECTORS * self.num_single_layers + 2 * DOUBLE_VECTORS * self.num_layers + FINAL_VECTORS

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, attention_mask=None):
        """Velocity [B, N, out_channels]. `timestep` [B] is sigma (multiplied by 1000 here, as
        diffusers does); `attention_mask` [Bt, T] the text tokens' mask (1 = attend), or None."""
        rows, text_rows = hidden_states.shape[0], encoder_hidden_states.shape[0]
        owner = image_row_of_text_rows(rows, text_rows)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = self.num_attention_heads * self.attention_head_dim
        sigma = jnp.broadcast_to(jnp.asarray(timestep, self.dtype), (rows,))
        table = ChromaApproximator(self.table_size, dim, self.approximator_num_channels, self.approximator_hidden_dim,
                                   self.approximator_layers, name="distilled_guidance_layer", **kw)(sigma * 1000)
        text_table = table[owner]  # the first `rows` text rows are the image rows' own

        img = nn.Dense(dim, name="x_embedder", **kw)(hidden_states.astype(self.dtype))
        txt = nn.Dense(dim, name="context_embedder", **kw)(encoder_hidden_states.astype(self.dtype))
        txt_rope = rope_cos_sin(txt_ids, self.axes_dims_rope, ROPE_THETA)
        img_rope = rope_cos_sin(img_ids, self.axes_dims_rope, ROPE_THETA)
        mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)

        heads = dict(heads=self.num_attention_heads, head_dim=self.attention_head_dim)
        image_offset = SINGLE_VECTORS * self.num_single_layers
        double, _ = self.layer_stacks
        txt, img = scan_blocks(ChromaDoubleBlock, double, (txt, img), text_table, txt_rope, img_rope, mask, **heads,
                               image_offset=image_offset, text_offset=image_offset + DOUBLE_VECTORS * self.num_layers,
                               **kw)
        _, img = FluxSingleStreamBlocks(self.num_single_layers, **heads, block=ChromaSingleBlock,
                                        name="single_transformer_blocks", **kw)(txt, img, text_table, txt_rope,
                                                                                img_rope, mask)
        shift, scale = table[:, -FINAL_VECTORS], table[:, -1]
        out_channels = self.patch_size**2 * (self.out_channels or self.in_channels)
        return nn.Dense(out_channels, name="proj_out", **kw)(modulate(layer_norm(img), shift, scale))
