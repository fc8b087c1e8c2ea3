"""diffusers-layout UNet checkpoints (`unet/config.json` + safetensors) -> models.unet params.

The key map is data: a module-path rule per kind of layer, each expanded into its `.weight` and
`.bias` rules. Flax module names are the diffusers module paths with dots made underscores
(`down_blocks.1.attentions.0` -> `down_blocks_1_attentions_0`), except inside a transformer
block's feed-forward (`ff.net.0.proj` -> `ff_proj`, `ff.net.2` -> `ff_out`).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp

from convert.checkpoint import Checkpoint, open_checkpoint, parse_dtype
from convert.mapping import LAYOUTS, Rule, map_checkpoint, target_shapes
from models.unet import UNet2DConditionModel


def _linear_or_1x1_conv(w):
    """A transformer's proj_in/proj_out: Linear [out, in] (SD2, SDXL) or Conv 1x1 [out, in, 1, 1]
    (SD1.5), both a Dense kernel [in, out] here."""
    return w.reshape(w.shape[0], w.shape[1]).T


LAYOUTS.setdefault("linear_or_1x1_conv", _linear_or_1x1_conv)

# kind -> (Flax name of the weight, layout of the weight); biases are always `bias`, as is.
_KINDS = {
    "norm": ("scale", "as_is"),
    "conv": ("kernel", "conv"),
    "linear": ("kernel", "linear"),
    "pointwise": ("kernel", "linear_or_1x1_conv"),
}

# Inside one resnet or transformer (Transformer2DModel) of a block: (module regex, target, kind).
_INNER = [
    (r"(?P<m>norm1|norm2)", r"\g<m>", "norm"),
    (r"(?P<m>conv1|conv2|conv_shortcut)", r"\g<m>", "conv"),
    (r"time_emb_proj", "time_emb_proj", "linear"),
    (r"norm", "norm", "norm"),
    (r"(?P<m>proj_in|proj_out)", r"\g<m>", "pointwise"),
    (r"transformer_blocks\.(?P<k>\d+)\.(?P<m>norm[123])", r"transformer_blocks_\g<k>/\g<m>", "norm"),
    (r"transformer_blocks\.(?P<k>\d+)\.(?P<a>attn[12])\.(?P<m>to_[qkv])", r"transformer_blocks_\g<k>/\g<a>/\g<m>",
     "linear"),
    (r"transformer_blocks\.(?P<k>\d+)\.(?P<a>attn[12])\.to_out\.0", r"transformer_blocks_\g<k>/\g<a>/to_out_0",
     "linear"),
    (r"transformer_blocks\.(?P<k>\d+)\.ff\.net\.0\.proj", r"transformer_blocks_\g<k>/ff_proj", "linear"),
    (r"transformer_blocks\.(?P<k>\d+)\.ff\.net\.2", r"transformer_blocks_\g<k>/ff_out", "linear"),
]

# The resnets and transformers of down/up blocks and of the mid block.
_BLOCK_PARTS = [
    (r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)", r"\1_\2_\3_\4"),
    (r"mid_block\.(resnets|attentions)\.(\d+)", r"mid_block_\1_\2"),
]

_MODULES = [
    (rf"{part}\.{inner}", rf"{part_target}/{inner_target}", kind)
    for part, part_target in _BLOCK_PARTS
    for inner, inner_target, kind in _INNER
] + [
    (r"(down_blocks|up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.conv", r"\1_\2_\3_0", "conv"),
    (r"(conv_in|conv_out)", r"\1", "conv"),
    (r"conv_norm_out", "conv_norm_out", "norm"),
    (r"(time_embedding|add_embedding)\.(linear_1|linear_2|cond_proj)", r"\1/\2", "linear"),
]

UNET_RULES = [
    rule
    for module, target, kind in _MODULES
    for rule in (
        Rule(rf"{module}\.weight", f"{target}/{_KINDS[kind][0]}", _KINDS[kind][1]),
        Rule(rf"{module}\.bias", f"{target}/bias"),
    )
]


def unet_init_args(module: UNet2DConditionModel) -> dict:
    """Smallest inputs that create every parameter (for shapes via jax.eval_shape)."""
    c = module.config
    side = 2 ** (len(c.block_out_channels) - 1)
    args = dict(
        sample=jnp.zeros((1, c.in_channels, side, side)),
        timesteps=jnp.zeros((1,)),
        encoder_hidden_states=jnp.zeros((1, 1, c.cross_attention_dim)),
    )
    if c.addition_embed_type == "text_time":
        # Only the total width of [text_embeds, time embeddings] fixes a parameter shape.
        text_width = c.projection_class_embeddings_input_dim - c.addition_time_embed_dim
        args["added_cond_kwargs"] = {"text_embeds": jnp.zeros((1, text_width)), "time_ids": jnp.zeros((1, 1))}
    return args


def unet_params(checkpoint: Checkpoint, module: UNet2DConditionModel, dtype="float32"):
    """Flax params of `module` from a checkpoint with diffusers UNet names (strict)."""
    shapes = target_shapes(module, **unet_init_args(module))
    return map_checkpoint(checkpoint, UNET_RULES, shapes, dtype, what=f"UNet from {checkpoint.description}")


def load_unet(folder_or_checkpoint, dtype="float32", config: dict | None = None):
    """(module, params) from a diffusers `unet/` folder (config.json and single or sharded
    safetensors), or from an opened Checkpoint with diffusers names plus its `config` dict.

    The module computes in `dtype` too; attention softmax and norms stay float32 inside.
    """
    if isinstance(folder_or_checkpoint, Checkpoint):
        if config is None:
            raise ValueError("config: a Checkpoint was passed without its UNet config dict; pass config=...")
        checkpoint = folder_or_checkpoint
    else:
        folder = Path(folder_or_checkpoint)
        if config is None:
            config = json.loads((folder / "config.json").read_text())
        checkpoint = open_checkpoint(folder)
    jax_dtype = jnp.dtype(parse_dtype(dtype))
    module = UNet2DConditionModel.from_config(config, dtype=jax_dtype, param_dtype=jax_dtype)
    return module, unet_params(checkpoint, module, dtype)
