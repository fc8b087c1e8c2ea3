"""diffusers AutoencoderKL checkpoints (vae/diffusion_pytorch_model.safetensors) -> Flax params.

The Flax layers carry their diffusers module paths as names (models/vae.py), so a key
`encoder.down_blocks.0.resnets.1.conv1.weight` becomes `encoder/down_blocks.0.resnets.1.conv1/kernel`;
the rules below only choose the leaf name and layout by layer kind. Old diffusers files name
the mid-block attention `query/key/value/proj_attn`; they are read as `to_q/to_k/to_v/to_out.0`.
"""

from __future__ import annotations

import jax.numpy as jnp

from convert.checkpoint import parse_dtype
from convert.clip import read_component
from convert.mapping import Rule, map_checkpoint, target_shapes
from models.vae import AutoencoderKL

_HALF = r"(encoder|decoder)\."
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

VAE_RULES = [
    *(
        Rule(_HALF + rf"(mid_block\.attentions\.0)\.{old}\.{leaf}", rf"\1/\2.{new}/{target}", layout)
        for old, new in _LEGACY_ATTENTION.items()
        for leaf, target, layout in (("weight", "kernel", "linear"), ("bias", "bias", "as_is"))
    ),
    Rule(_HALF + r"(.+\.(?:to_[qkv]|to_out\.0))\.weight", r"\1/\2/kernel", "linear"),
    Rule(_HALF + r"(.+\.(?:to_[qkv]|to_out\.0))\.bias", r"\1/\2/bias"),
    Rule(_HALF + r"(.*norm\w*)\.weight", r"\1/\2/scale"),  # norm1/2, group_norm, conv_norm_out
    Rule(_HALF + r"(.*norm\w*)\.bias", r"\1/\2/bias"),
    Rule(_HALF + r"(.+)\.weight", r"\1/\2/kernel", "conv"),  # every other layer is a convolution
    Rule(_HALF + r"(.+)\.bias", r"\1/\2/bias"),
    Rule(r"(quant_conv|post_quant_conv)\.weight", r"\1/kernel", "conv"),
    Rule(r"(quant_conv|post_quant_conv)\.bias", r"\1/bias"),
]


def load_vae(folder_or_checkpoint, config: dict | None = None, dtype="float32"):
    """-> (AutoencoderKL, params) from a diffusers vae folder."""
    config, checkpoint = read_component(folder_or_checkpoint, config)
    jax_dtype = jnp.dtype(parse_dtype(dtype))
    module = AutoencoderKL.from_config(config, dtype=jax_dtype, param_dtype=jax_dtype)
    size = 2 ** len(module.config.block_out_channels)
    shapes = target_shapes(module, jnp.zeros((1, module.config.in_channels, size, size), jax_dtype))
    return module, map_checkpoint(checkpoint, VAE_RULES, shapes, dtype, "VAE")
