"""Tiny random SD3 / SD3.5 transformers built with diffusers, saved as users have them.

Three variants of diffusers' SD3Transformer2DModel: "sd3" (SD3-Medium: no QK-norm),
"sd35_large" (RMS QK-norm) and "sd35_medium" (QK-norm plus MMDiT-X dual attention in the
first blocks). Weights are redrawn at random (scaled by 1/sqrt(fan-in); QK-norm scales near
1) so every parameter, modulations included, moves the output visibly.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import save_file

from tiny_components import randomize_mmdit

BASE_CONFIG = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    caption_projection_dim=32,
    pooled_projection_dim=20,
    out_channels=4,
    pos_embed_max_size=16,
)
VARIANTS = {
    "sd3": dict(qk_norm=None, dual_attention_layers=()),
    "sd35_large": dict(qk_norm="rms_norm", dual_attention_layers=()),
    "sd35_medium": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)),
}


def build_model(variant: str, seed: int = 0) -> SD3Transformer2DModel:
    """A float32 diffusers model in eval mode with every parameter drawn at random."""
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**BASE_CONFIG, **VARIANTS[variant]).eval()
    return randomize_mmdit(model, seed + 1)


def save_diffusers(model: SD3Transformer2DModel, folder, sharded: bool) -> None:
    """`transformer/` as published: config.json plus safetensors, sharded with an index if asked."""
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB" if sharded else "10GB")


def _fuse(*tensors):
    return torch.cat(tensors, dim=0)


def _swap_halves(tensor):
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def single_file_state_dict(model: SD3Transformer2DModel) -> dict[str, torch.Tensor]:
    """Stability's single-file naming, from the diffusers weights (the inverse of diffusers'
    convert_sd3_transformer_checkpoint_to_diffusers), with the `model.diffusion_model.`
    prefix and a stray VAE tensor as in the all-in-one files."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    last = model.config.num_layers - 1
    out = {
        "pos_embed": sd.pop("pos_embed.pos_embed"),
        "x_embedder.proj.weight": sd.pop("pos_embed.proj.weight"),
        "x_embedder.proj.bias": sd.pop("pos_embed.proj.bias"),
        "final_layer.adaLN_modulation.1.weight": _swap_halves(sd.pop("norm_out.linear.weight")),
        "final_layer.adaLN_modulation.1.bias": _swap_halves(sd.pop("norm_out.linear.bias")),
    }
    for kind in ("weight", "bias"):
        for index in range(model.config.num_layers):
            prefix, new = f"transformer_blocks.{index}.", f"joint_blocks.{index}."
            out[new + f"x_block.attn.qkv.{kind}"] = _fuse(*(sd.pop(f"{prefix}attn.to_{p}.{kind}") for p in "qkv"))
            out[new + f"context_block.attn.qkv.{kind}"] = _fuse(
                *(sd.pop(f"{prefix}attn.add_{p}_proj.{kind}") for p in "qkv")
            )
            if f"{prefix}attn2.to_q.{kind}" in sd:
                out[new + f"x_block.attn2.qkv.{kind}"] = _fuse(*(sd.pop(f"{prefix}attn2.to_{p}.{kind}") for p in "qkv"))
            context_mod = sd.pop(f"{prefix}norm1_context.linear.{kind}")
            out[new + f"context_block.adaLN_modulation.1.{kind}"] = _swap_halves(context_mod) if index == last else context_mod
    renames = [
        ("time_text_embed.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
        ("time_text_embed.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
        ("time_text_embed.text_embedder.linear_1.", "y_embedder.mlp.0."),
        ("time_text_embed.text_embedder.linear_2.", "y_embedder.mlp.2."),
        ("proj_out.", "final_layer.linear."),
        ("transformer_blocks.", "joint_blocks."),
        (".norm1.linear.", ".x_block.adaLN_modulation.1."),
        (".attn.norm_added_q.", ".context_block.attn.ln_q."),
        (".attn.norm_added_k.", ".context_block.attn.ln_k."),
        (".attn.norm_q.", ".x_block.attn.ln_q."),
        (".attn.norm_k.", ".x_block.attn.ln_k."),
        (".attn2.norm_q.", ".x_block.attn2.ln_q."),
        (".attn2.norm_k.", ".x_block.attn2.ln_k."),
        (".attn.to_out.0.", ".x_block.attn.proj."),
        (".attn.to_add_out.", ".context_block.attn.proj."),
        (".attn2.to_out.0.", ".x_block.attn2.proj."),
        (".ff.net.0.proj.", ".x_block.mlp.fc1."),
        (".ff.net.2.", ".x_block.mlp.fc2."),
        (".ff_context.net.0.proj.", ".context_block.mlp.fc1."),
        (".ff_context.net.2.", ".context_block.mlp.fc2."),
    ]
    for key, value in sd.items():
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    prefixed = {"model.diffusion_model." + k: v.contiguous() for k, v in out.items()}
    prefixed["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
    return prefixed


def save_single_file(model: SD3Transformer2DModel, path) -> None:
    save_file(single_file_state_dict(model), str(path))


def sample_inputs(batch: int, text_rows: int | None = None, seed: int = 0):
    """(latents [B,4,12,8], text [Bt,5,24], pooled [Bt,20], timestep [B]) as numpy float32.

    The latent is not square and smaller than the position table, so cropping is exercised.
    """
    rng = np.random.default_rng(seed)
    text_rows = text_rows or batch
    cfg = BASE_CONFIG
    return (
        rng.standard_normal((batch, cfg["in_channels"], 12, 8)).astype(np.float32),
        rng.standard_normal((text_rows, 5, cfg["joint_attention_dim"])).astype(np.float32),
        rng.standard_normal((text_rows, cfg["pooled_projection_dim"])).astype(np.float32),
        np.linspace(900.0, 120.5, batch).astype(np.float32),
    )
