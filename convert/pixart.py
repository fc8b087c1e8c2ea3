"""diffusers `PixArtTransformer2DModel` folders -> `models.pixart.PixArtTransformer` parameters.

The key map is data: per-layer keys `transformer_blocks.N....` go to `blocks_N/...` (the
cross-attention's to_k / to_v to `text_blocks_N/...`, the model's text part) and are stacked into
the scanned `blocks/...` and `text_blocks/...` arrays by `map_checkpoint`.
"""

from __future__ import annotations

import jax.numpy as jnp

from convert.checkpoint import parse_dtype
from convert.clip import read_component
from convert.mapping import Rule, map_checkpoint, target_shapes
from models.pixart import PixArtTransformer

_BLOCK = r"transformer_blocks\.(\d+)\."

# Linear layers: (checkpoint module regex, Flax module template); weight -> kernel, bias -> bias.
PIXART_LINEARS = [
    (r"adaln_single\.emb\.(timestep_embedder|resolution_embedder|aspect_ratio_embedder)\.(linear_[12])",
     r"adaln_single/\1/\2"),
    (r"adaln_single\.linear", "adaln_single/linear"),
    (r"caption_projection\.(linear_[12])", r"caption_projection/\1"),
    (_BLOCK + r"attn1\.(to_[qkv])", r"blocks_\1/attn1/\2"),
    (_BLOCK + r"attn2\.to_q", r"blocks_\1/attn2/to_q"),
    (_BLOCK + r"attn2\.(to_[kv])", r"text_blocks_\1/\2"),  # the caption's keys/values: once per sampling run
    (_BLOCK + r"(attn[12])\.to_out\.0", r"blocks_\1/\2/to_out"),
    (_BLOCK + r"ff\.net\.0\.proj", r"blocks_\1/ff/proj_in"),
    (_BLOCK + r"ff\.net\.2", r"blocks_\1/ff/proj_out"),
    (r"proj_out", "proj_out"),
]


def linear_rules(table) -> list[Rule]:
    """torch Linear weight/bias rules for each (module regex, Flax module) pair of `table`."""
    return [rule for source, target in table for rule in (Rule(source + r"\.weight", target + "/kernel", "linear"),
                                                          Rule(source + r"\.bias", target + "/bias"))]


PIXART_RULES = linear_rules(PIXART_LINEARS) + [
    Rule(r"pos_embed\.proj\.weight", "patch_embed/kernel", "conv"),
    Rule(r"pos_embed\.proj\.bias", "patch_embed/bias"),
    Rule(_BLOCK + r"scale_shift_table", r"blocks_\1/scale_shift_table"),
    Rule(r"scale_shift_table", "scale_shift_table"),
]


def load_pixart_transformer(folder, dtype="float32", config: dict | None = None):
    """A diffusers `transformer/` folder (or a converted one) -> (PixArtTransformer, params)."""
    config, checkpoint = read_component(folder, config)
    jax_dtype = jnp.dtype(parse_dtype(dtype))
    module = PixArtTransformer.from_config(config, dtype=jax_dtype, param_dtype=jax_dtype)
    cfg = module.config
    patch = cfg.patch_size
    context_width = cfg.caption_channels or cfg.inner_dim
    shapes = target_shapes(module, jnp.zeros((1, cfg.in_channels, patch, patch)), jnp.zeros((1, 1, context_width)),
                           jnp.ones((1, 1)), jnp.zeros((1,)), jnp.zeros((1, 2)), jnp.ones((1, 1)))
    params = map_checkpoint(checkpoint, PIXART_RULES, shapes, dtype, "PixArt transformer",
                            stacks=module.layer_stacks)
    return module, params
