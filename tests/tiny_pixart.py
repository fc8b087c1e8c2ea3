"""A tiny random PixArt-Sigma pipeline folder, laid out as PixArt-alpha/PixArt-Sigma-XL-2-1024-MS.

transformer/ (PixArtTransformer2DModel: learned sigma, caption projection from the T5 width,
no resolution conditions, interpolation_scale 2 as published), text_encoder/ (T5) and tokenizer/,
vae/ (4-channel AutoencoderKL, 2x), scheduler/ (the published DPMSolverMultistepScheduler
config), model_index.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import PixArtTransformer2DModel

from tiny_components import save_tiny_t5, save_tiny_t5_tokenizer, save_tiny_vae

T5_WIDTH = 32
TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                   cross_attention_dim=32, caption_channels=T5_WIDTH, sample_size=16, patch_size=2,
                   interpolation_scale=2, use_additional_conditions=False, norm_num_groups=4)
# PixArt-Sigma-XL-2-1024-MS scheduler/scheduler_config.json
SCHEDULER = {"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.22.0.dev0",
             "algorithm_type": "dpmsolver++", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
             "dynamic_thresholding_ratio": 0.995, "euler_at_final": False, "lambda_min_clipped": float("-inf"),
             "lower_order_final": True, "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "sample_max_value": 1.0, "solver_order": 2, "solver_type": "midpoint", "steps_offset": 0,
             "thresholding": False, "timestep_spacing": "linspace", "trained_betas": None,
             "use_karras_sigmas": False, "variance_type": None}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter redrawn at 1/sqrt(fan-in), so the zero-initialized ones move the output too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) / max(param.shape[-1], 1) ** 0.5)
    return model


def random_transformer(seed: int = 5, **overrides) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    return randomize(PixArtTransformer2DModel(**dict(TRANSFORMER, **overrides)).eval(), seed + 1)


def make_pixart_pipeline(folder) -> Path:
    folder = Path(folder)
    random_transformer().save_pretrained(str(folder / "transformer"))
    save_tiny_vae(folder / "vae", latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4)
    save_tiny_t5_tokenizer(folder / "tokenizer")
    save_tiny_t5(folder / "text_encoder", d_model=T5_WIDTH, seed=3)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    index = {"_class_name": "PixArtSigmaPipeline", "_diffusers_version": "0.28.0.dev0",
             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
             "text_encoder": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "PixArtTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
