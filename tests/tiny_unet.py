"""Tiny random diffusers UNets in the four layouts nag-jax supports, saved as users have them.

Each builder returns the PyTorch model (the reference) and the folder it was saved to with
`save_pretrained` (safetensors; the SDXL-like one sharded like the published SDXL repos).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import UNet2DConditionModel

_COMMON = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    norm_num_groups=8,
    layers_per_block=1,
    cross_attention_dim=32,
)

CONFIGS = {
    # conv proj_in/out, one head count for all blocks
    "sd15": dict(
        _COMMON,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    ),
    # linear projections, head counts per block
    "sd2": dict(
        _COMMON,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
    ),
    # text_time added conditioning (pooled text + 6 time ids), deeper transformers in the last block
    "sdxl": dict(
        _COMMON,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        cross_attention_dim=48,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
    ),
    # LCM-style guidance embedding
    "lcm": dict(
        _COMMON,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        time_cond_proj_dim=16,
    ),
}

POOLED_WIDTH = 16  # SDXL-like text_embeds width (projection input minus the time ids' share)


def make_unet(kind: str, folder, seed: int = 0):
    """Build, randomize (norms included, so they are tested) and save a tiny UNet."""
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**CONFIGS[kind]).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # diffusers zero-initializes some output layers; random values test every weight
            param.copy_(torch.randn_like(param) * (0.2 if param.ndim > 1 else 0.1) + (1.0 if "norm" in name
                        and name.endswith("weight") else 0.0))
    shard = "60KB" if kind == "sdxl" else "10GB"
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=shard)
    return model, folder


def make_inputs(kind: str, batch: int = 2, context_rows: int | None = None, seed: int = 1):
    """numpy inputs: sample, timesteps, context (context_rows rows), and per kind extras."""
    rng = np.random.default_rng(seed)
    config = CONFIGS[kind]
    rows = batch if context_rows is None else context_rows
    inputs = dict(
        sample=rng.standard_normal((batch, 4, 16, 16)).astype(np.float32),
        timesteps=np.array([999.0, 451.0, 17.0, 3.0][:batch], np.float32),
        encoder_hidden_states=rng.standard_normal((rows, 7, config["cross_attention_dim"])).astype(np.float32),
    )
    if kind == "sdxl":
        inputs["added_cond_kwargs"] = dict(
            text_embeds=rng.standard_normal((batch, POOLED_WIDTH)).astype(np.float32),
            time_ids=np.tile(np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32), (batch, 1)),
        )
    if kind == "lcm":
        inputs["timestep_cond"] = rng.standard_normal((batch, 16)).astype(np.float32)
    return inputs


def torch_forward(model, inputs, context=None):
    """The reference forward on the same numpy inputs -> numpy."""
    tensors = {
        "sample": torch.from_numpy(inputs["sample"]),
        "timestep": torch.from_numpy(inputs["timesteps"]),
        "encoder_hidden_states": torch.from_numpy(inputs["encoder_hidden_states"] if context is None else context),
    }
    if "added_cond_kwargs" in inputs:
        tensors["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in inputs["added_cond_kwargs"].items()}
    if "timestep_cond" in inputs:
        tensors["timestep_cond"] = torch.from_numpy(inputs["timestep_cond"])
    with torch.no_grad():
        return model(**tensors).sample.numpy()
