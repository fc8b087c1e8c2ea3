"""diffusers `AutoencoderDC` folders (SANA's `vae/`) -> `models.dc_ae.DCAutoencoder` parameters.

Key map as data. Stage blocks `encoder.down_blocks.S.I.` / `decoder.up_blocks.S.I.` become
`encoder/down_blocks_S_I/`; a down/up-sampling block's `.conv` and a sampling `conv_in` /
`conv_out` map onto the convolution itself. 1x1 convolutions of GLU-MBConv are Dense layers.
"""

from __future__ import annotations

import jax.numpy as jnp

import convert.sana  # noqa: F401  (registers the pointwise_conv layout)
from convert.checkpoint import parse_dtype
from convert.clip import read_component
from convert.mapping import Rule, map_checkpoint, target_shapes
from models.dc_ae import DCAutoencoder

_PART = r"(encoder|decoder)\."
_BLOCK = _PART + r"(down|up)_blocks\.(\d+)\.(\d+)\."
_TO = r"\1/\2_blocks_\3_\4/"

DC_AE_RULES = [
    Rule(_PART + r"(conv_in|conv_out)(?:\.conv)?\.weight", r"\1/\2/kernel", "conv"),
    Rule(_PART + r"(conv_in|conv_out)(?:\.conv)?\.bias", r"\1/\2/bias"),
    Rule(r"decoder\.norm_out\.(weight|bias)", r"decoder/norm_out/\1"),
    Rule(_BLOCK + r"(?:conv\.)?weight", _TO + "kernel", "conv"),  # a sampling block's conv
    Rule(_BLOCK + r"(?:conv\.)?bias", _TO + "bias"),
    Rule(_BLOCK + r"(conv[12])\.weight", _TO + r"\5/kernel", "conv"),
    Rule(_BLOCK + r"(conv1)\.bias", _TO + r"\5/bias"),
    Rule(_BLOCK + r"norm\.(weight|bias|running_mean|running_var)", _TO + r"norm/\5"),
    Rule(_BLOCK + r"attn\.norm_out\.(weight|bias|running_mean|running_var)", _TO + r"attn/norm_out/\5"),
    Rule(_BLOCK + r"conv_out\.norm\.(weight|bias)", _TO + r"conv_out/norm/\5"),
    Rule(_BLOCK + r"attn\.(to_[qkv]|to_out)\.weight", _TO + r"attn/\5/kernel", "linear"),
    Rule(_BLOCK + r"attn\.to_qkv_multiscale\.(\d+)\.(proj_in|proj_out)\.weight",
         _TO + r"attn/to_qkv_multiscale_\5_\6/kernel", "conv"),
    Rule(_BLOCK + r"conv_out\.(conv_inverted|conv_point)\.weight", _TO + r"conv_out/\5/kernel", "pointwise_conv"),
    Rule(_BLOCK + r"conv_out\.(conv_inverted|conv_depth)\.bias", _TO + r"conv_out/\5/bias"),
    Rule(_BLOCK + r"conv_out\.conv_depth\.weight", _TO + r"conv_out/conv_depth/kernel", "conv"),
]


def load_dc_ae(folder, dtype="float32", config: dict | None = None):
    """A diffusers `vae/` folder (AutoencoderDC) -> (DCAutoencoder, params)."""
    config, checkpoint = read_component(folder, config)
    checkpoint = checkpoint.renamed(lambda key: None if key.endswith("num_batches_tracked") else key)
    jax_dtype = jnp.dtype(parse_dtype(dtype))
    module = DCAutoencoder.from_config(config, dtype=jax_dtype, param_dtype=jax_dtype)
    size = module.config.spatial_compression_ratio
    shapes = target_shapes(module, jnp.zeros((1, module.config.in_channels, size, size)))
    return module, map_checkpoint(checkpoint, DC_AE_RULES, shapes, dtype, "DC-AE")
