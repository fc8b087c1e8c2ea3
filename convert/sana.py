"""diffusers `SanaTransformer2DModel` folders (SANA, SANA-Sprint) -> `models.sana.SanaTransformer` parameters.

A key map as data, per layer (`transformer_blocks.N.` -> `blocks_N/`, the cross-attention's to_k / to_v /
norm_k -> `text_blocks_N/`), stacked for the scans by `map_checkpoint`.
GLU-MBConv's 1x1 convolutions are Dense layers on the tokens (`pointwise_conv` layout).
"""

from __future__ import annotations

import jax.numpy as jnp

from convert.checkpoint import parse_dtype
from convert.clip import read_component
from convert.mapping import LAYOUTS, Rule, map_checkpoint, target_shapes
from convert.pixart import linear_rules
from models.sana import SanaTransformer

LAYOUTS["pointwise_conv"] = lambda w: w[:, :, 0, 0].T  # torch Conv2d 1x1 [out, in, 1, 1] -> Dense [in, out]

_BLOCK = r"transformer_blocks\.(\d+)\."

SANA_LINEARS = [
    (r"time_embed\.(?:emb\.)?(timestep_embedder|guidance_embedder)\.(linear_[12])", r"time_embed/\1/\2"),
    (r"time_embed\.linear", "time_embed/linear"),
    (r"caption_projection\.(linear_[12])", r"caption_projection/\1"),
    (_BLOCK + r"attn1\.(to_[qkv])", r"blocks_\1/attn1/\2"),
    (_BLOCK + r"attn2\.to_q", r"blocks_\1/attn2/to_q"),
    (_BLOCK + r"attn2\.(to_[kv])", r"text_blocks_\1/\2"),  # the caption's keys/values: once per sampling run
    (_BLOCK + r"(attn[12])\.to_out\.0", r"blocks_\1/\2/to_out"),
    (r"proj_out", "proj_out"),
]

SANA_RULES = linear_rules(SANA_LINEARS) + [
    Rule(r"patch_embed\.proj\.weight", "patch_embed/kernel", "conv"),
    Rule(r"patch_embed\.proj\.bias", "patch_embed/bias"),
    Rule(r"caption_norm\.weight", "caption_norm/scale"),
    Rule(_BLOCK + r"attn1\.norm_([qk])\.weight", r"blocks_\1/attn1/norm_\2/scale"),
    Rule(_BLOCK + r"attn2\.norm_q\.weight", r"blocks_\1/attn2/norm_q/scale"),
    Rule(_BLOCK + r"attn2\.norm_k\.weight", r"text_blocks_\1/norm_k/scale"),
    Rule(_BLOCK + r"ff\.conv_(inverted|point)\.weight", r"blocks_\1/ff/conv_\2/kernel", "pointwise_conv"),
    Rule(_BLOCK + r"ff\.conv_inverted\.bias", r"blocks_\1/ff/conv_inverted/bias"),
    Rule(_BLOCK + r"ff\.conv_depth\.weight", r"blocks_\1/ff/conv_depth/kernel", "conv"),
    Rule(_BLOCK + r"ff\.conv_depth\.bias", r"blocks_\1/ff/conv_depth/bias"),
    Rule(_BLOCK + r"scale_shift_table", r"blocks_\1/scale_shift_table"),
    Rule(r"scale_shift_table", "scale_shift_table"),
]


def sana_param_shapes(module: SanaTransformer) -> dict:
    """Flat Flax parameter shapes of `module` from a one-patch input (nothing allocated)."""
    cfg = module.config
    patch = cfg.patch_size
    return target_shapes(module, jnp.zeros((1, cfg.in_channels, patch, patch)), jnp.zeros((1, 1, cfg.caption_channels)),
                         jnp.ones((1, 1)), jnp.zeros((1,)), jnp.zeros((1,)))


def load_sana_transformer(folder, dtype="float32", config: dict | None = None):
    """A diffusers `transformer/` folder (or a converted one) -> (SanaTransformer, params)."""
    config, checkpoint = read_component(folder, config)
    jax_dtype = jnp.dtype(parse_dtype(dtype))
    module = SanaTransformer.from_config(config, dtype=jax_dtype, param_dtype=jax_dtype)
    params = map_checkpoint(checkpoint, SANA_RULES, sana_param_shapes(module), dtype, "SANA transformer",
                            stacks=module.layer_stacks)
    return module, params
