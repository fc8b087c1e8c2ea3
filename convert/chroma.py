"""Chroma transformer checkpoints -> `models.chroma.ChromaTransformer2DModel` parameters.

Chroma's blocks carry Flux's weights minus the modulation layers, so Flux's key maps
(convert/flux.py) serve for everything but the approximator, whose rules are added here:
- diffusers' `transformer/` folder (ChromaPipeline layout), and
- the original single file (`chroma-unlocked-v*.safetensors`, `Chroma1-HD.safetensors`: Black
  Forest Labs' block naming, approximator `distilled_guidance_layer.layers.N.in_layer/out_layer`
  and `norms.N.scale`), optionally prefixed `model.diffusion_model.`.
A single file's config is read off its shapes.
"""

from __future__ import annotations

import numpy as np

from convert.checkpoint import Checkpoint, parse_dtype
from convert.flux import (BFL_RULES, DIFFUSERS_RULES, _block_count, _dense, _scale, is_bfl_checkpoint, open_transformer,
                          strip_bfl_prefix)
from convert.mapping import map_checkpoint, target_shapes
from models.chroma import ChromaTransformer2DModel

_APPROXIMATOR = r"distilled_guidance_layer\."
_APPROXIMATOR_IO = [*_dense(_APPROXIMATOR + r"(in_proj|out_proj)", r"distilled_guidance_layer/\1")]
CHROMA_DIFFUSERS_RULES = [
    *_APPROXIMATOR_IO,
    *_dense(_APPROXIMATOR + r"layers\.(\d+)\.linear_([12])", r"distilled_guidance_layer/layers_\1/linear_\2"),
    _scale(_APPROXIMATOR + r"norms\.(\d+)\.weight", r"distilled_guidance_layer/norms_\1"),
    *DIFFUSERS_RULES,
]
_BFL_LAYERS = {"in_layer": "linear_1", "out_layer": "linear_2"}
CHROMA_BFL_RULES = [
    *_APPROXIMATOR_IO,
    *(rule for bfl, ours in _BFL_LAYERS.items()
      for rule in _dense(_APPROXIMATOR + rf"layers\.(\d+)\.{bfl}", rf"distilled_guidance_layer/layers_\1/{ours}")),
    _scale(_APPROXIMATOR + r"norms\.(\d+)\.scale", r"distilled_guidance_layer/norms_\1"),
    *BFL_RULES,
]


def infer_chroma_config(checkpoint: Checkpoint) -> dict:
    """A diffusers-style config read off the shapes of a (prefix-stripped) original Chroma checkpoint."""
    required = ("img_in.weight", "txt_in.weight", "distilled_guidance_layer.in_proj.weight",
                "double_blocks.0.img_attn.norm.query_norm.scale")
    checkpoint.require(required, "a Chroma checkpoint")
    dim, in_channels = checkpoint.shape("img_in.weight")
    head_dim = checkpoint.shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    hidden, channels = checkpoint.shape("distilled_guidance_layer.in_proj.weight")
    return dict(
        in_channels=in_channels,
        num_layers=_block_count(checkpoint, r"double_blocks\.(\d+)\."),
        num_single_layers=_block_count(checkpoint, r"single_blocks\.(\d+)\."),
        attention_head_dim=head_dim,
        num_attention_heads=dim // head_dim,
        joint_attention_dim=checkpoint.shape("txt_in.weight")[1],
        approximator_num_channels=channels,
        approximator_hidden_dim=hidden,
        approximator_layers=_block_count(checkpoint, r"distilled_guidance_layer\.layers\.(\d+)\."),
        **({"axes_dims_rope": (16, 56, 56)} if head_dim == 128 else {}),
    )


def chroma_params(checkpoint: Checkpoint, model: ChromaTransformer2DModel, dtype="float32"):
    """Parameters of `model` from a diffusers-layout or original Chroma checkpoint (strict)."""
    if is_bfl_checkpoint(checkpoint):
        checkpoint, rules, what = strip_bfl_prefix(checkpoint), CHROMA_BFL_RULES, "Chroma transformer (single file)"
    else:
        rules, what = CHROMA_DIFFUSERS_RULES, "Chroma transformer (diffusers)"
    zeros = np.zeros
    inputs = (zeros((1, 1, model.in_channels), np.float32), zeros((1, 1, model.joint_attention_dim), np.float32),
              zeros((1,), np.float32), zeros((1, 3), np.float32), zeros((1, 3), np.float32))
    return map_checkpoint(checkpoint, rules, target_shapes(model, *inputs), dtype,
                          what=f"{what} {checkpoint.description}", stacks=model.layer_stacks)


def load_chroma_transformer(path, dtype="float32", config: dict | None = None):
    """(module, params) from a diffusers `transformer/` folder (or its pipeline folder) or an
    original Chroma single file (configured from its shapes; `config` entries override)."""
    checkpoint, full_config = open_transformer(path, config, infer_chroma_config, "Chroma")
    if full_config is None:
        raise ValueError(f"{path}: not an original Chroma single file (no double_blocks.* keys); "
                         "use the diffusers transformer/ folder")
    jnp_dtype = parse_dtype(dtype)
    model = ChromaTransformer2DModel.from_config(full_config, dtype=jnp_dtype, param_dtype=jnp_dtype)
    return model, chroma_params(checkpoint, model, dtype)
