"""Wan VAE checkpoints -> Flax params: the diffusers `vae/` folder (AutoencoderKLWan: Wan2.1's,
and Wan2.2's residual one) and the original single files (`Wan2.1_VAE.pth`, `Wan2.2_VAE.pth`,
ComfyUI's `wan_2.1_vae.safetensors` / `wan2.2_vae.safetensors`, any dtype incl. fp8).

The Flax layers carry their diffusers module paths as names (models/wan_vae.py), so the folder's
`decoder.up_blocks.0.resnets.1.conv1.weight` becomes `decoder/up_blocks.0.resnets.1.conv1/kernel`.
The original release names the same layers differently (its `vae.py`): `encoder.conv1`,
`encoder.downsamples.N` (the same flat numbering as diffusers' down_blocks), `middle.{0,1,2}`,
`head.{0,2}`, resnets as `residual.{0,2,3,6}` + `shortcut`, the decoder's stages flattened into
`decoder.upsamples.K` (each stage's num_res_blocks + 1 resnets, then its resampler), and the
quant convs as top-level `conv1` / `conv2`. Wan2.2's release (`vae2_2.py`) nests each stage
instead: `encoder.downsamples.I.downsamples.J` and `decoder.upsamples.I.upsamples.J` hold the
stage's resnets, then its resampler (diffusers' `down_blocks.I.downsampler` /
`up_blocks.I.upsampler`). `original_to_diffusers` renames those keys lazily; the tests check the
Wan2.1 naming against diffusers' own `convert_wan_vae_to_diffusers` (diffusers has no Wan2.2
single-file converter; its conversion script's mapping is the reference for the nesting).
"""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp

from convert.checkpoint import open_checkpoint, parse_dtype
from convert.clip import read_component
from convert.mapping import Rule, map_checkpoint, target_shapes
from models.wan_vae import WAN22_VAE, AutoencoderKLWan, WanVAEConfig

_HALF = r"(encoder|decoder)\."

WAN_VAE_RULES = [
    Rule(_HALF + r"(.+)\.gamma", r"\1/\2/gamma", "flatten"),  # RMS norms
    Rule(_HALF + r"(.+)\.weight", r"\1/\2/kernel", "conv"),  # every other weight is a convolution
    Rule(_HALF + r"(.+)\.bias", r"\1/\2/bias"),
    Rule(r"(quant_conv|post_quant_conv)\.weight", r"\1/kernel", "conv"),
    Rule(r"(quant_conv|post_quant_conv)\.bias", r"\1/bias"),
]

# Original module path -> diffusers module path, for the layers outside the numbered blocks.
_ORIGINAL_FIXED = {
    "conv1": "quant_conv",
    "conv2": "post_quant_conv",
    **{f"{half}.{old}": f"{half}.{new}" for half in ("encoder", "decoder")
       for old, new in (("conv1", "conv_in"), ("head.0", "norm_out"), ("head.2", "conv_out"))},
}
_ORIGINAL_RESNET = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
                    "shortcut": "conv_shortcut"}
_ORIGINAL_MIDDLE = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}
# The single-file marker diffusers uses to recognise an original Wan VAE; Wan2.2's nested stages.
_ORIGINAL_MARKER = "decoder.middle.0.residual.0.gamma"
_WAN22_MARKER = "encoder.downsamples.0.downsamples.0.residual.0.gamma"


def original_to_diffusers(num_res_blocks: int, residual: bool = False):
    """-> rename(key): an original Wan VAE key (Wan2.2's with residual=True) -> its diffusers
    AutoencoderKLWan key (unknown keys pass unchanged, so the strict mapping reports them)."""
    per_stage = num_res_blocks + 2  # the decoder's resnets, then its resampler

    def rename(key):
        module, _, leaf = key.rpartition(".")
        if module in _ORIGINAL_FIXED:
            return f"{_ORIGINAL_FIXED[module]}.{leaf}"
        match = re.fullmatch(r"(encoder|decoder)\.(downsamples|upsamples|middle)\.(\d+)\.(.+)", module)
        if match is None:
            return key
        half, group, index, inner = match.groups()
        nested = re.fullmatch(group + r"\.(\d+)\.(.+)", inner) if residual else None
        if nested:
            position, inner = nested.groups()
            kind = group.removesuffix("samples")  # "down" / "up"
            sampler = inner.startswith(("resample.", "time_conv"))
            block = f"{kind}_blocks.{index}." + (f"{kind}sampler" if sampler else f"resnets.{position}")
        elif group == "downsamples":
            block = f"down_blocks.{index}"
        elif group == "middle":
            block = _ORIGINAL_MIDDLE.get(index, f"middle.{index}")
        else:
            stage, position = divmod(int(index), per_stage)
            block = f"up_blocks.{stage}." + (f"resnets.{position}" if position <= num_res_blocks else "upsamplers.0")
        return f"{half}.{block}.{_ORIGINAL_RESNET.get(inner, inner)}.{leaf}"

    return rename


def load_wan_vae(path, dtype="float32", config: dict | None = None, *, allow_pickle: bool = False):
    """-> (AutoencoderKLWan, params).

    path: the diffusers `vae/` folder (config.json + safetensors), or an original single file
    (`wan_2.1_vae.safetensors`, `wan2.2_vae.safetensors`, fp8 included; `.pth` with
    allow_pickle=True), read with `config` (a diffusers vae config dict; default: the published
    Wan2.1 or, for Wan2.2's naming, Wan2.2 one).
    """
    path = Path(path)
    if path.is_dir():
        config, checkpoint = read_component(path, config)
    else:
        checkpoint = open_checkpoint(path, allow_pickle=allow_pickle)
        if config is None and _WAN22_MARKER in checkpoint:
            config = WAN22_VAE
    vae_config = WanVAEConfig.from_dict(config or {})
    if _ORIGINAL_MARKER in checkpoint:
        checkpoint = checkpoint.renamed(original_to_diffusers(vae_config.num_res_blocks, vae_config.is_residual))
    jax_dtype = jnp.dtype(parse_dtype(dtype))
    module = AutoencoderKLWan(vae_config, dtype=jax_dtype, param_dtype=jax_dtype)
    shapes = target_shapes(module, module.init_input())
    return module, map_checkpoint(checkpoint, WAN_VAE_RULES, shapes, dtype, "Wan VAE")
