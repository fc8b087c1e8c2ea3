"""The cross-attention DiTs in the FLOP benchmark (nag_jax/bench.py): PixArt-Sigma and SANA-1.6B
at 1024x1024 as published, and small configurations for `--tiny`. NAG here only adds the
negative text rows' keys/values and one extra cross-attention per block (nag-semantics.md section 2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.layers import unrolled_layers
from models.pixart import PixArtTransformer
from models.sana import SanaTransformer

DIT_FAMILIES = ("pixart", "sana")

PIXART_SIGMA_CONFIG = {  # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, transformer/config.json
    "attention_bias": True, "attention_head_dim": 72, "caption_channels": 4096, "in_channels": 4,
    "interpolation_scale": 2, "norm_eps": 1e-6, "num_attention_heads": 16, "num_layers": 28, "out_channels": 8,
    "patch_size": 2, "sample_size": 128, "use_additional_conditions": False,
}
SANA_1600M_CONFIG = {  # Efficient-Large-Model/Sana_1600M_1024px_diffusers, transformer/config.json
    "attention_bias": False, "attention_head_dim": 32, "caption_channels": 2304, "cross_attention_head_dim": 112,
    "in_channels": 32, "interpolation_scale": None, "mlp_ratio": 2.5, "num_attention_heads": 70,
    "num_cross_attention_heads": 20, "num_layers": 20, "out_channels": 32, "patch_size": 1, "sample_size": 32,
}
TINY_CONFIGS = {
    "pixart": dict(PIXART_SIGMA_CONFIG, attention_head_dim=32, caption_channels=64, num_attention_heads=2,
                   num_layers=2, sample_size=16),
    "sana": dict(SANA_1600M_CONFIG, attention_head_dim=32, caption_channels=64, cross_attention_head_dim=32,
                 num_attention_heads=2, num_cross_attention_heads=2, num_layers=2, sample_size=16),
}
# 1024x1024: PixArt 8x VAE -> 128x128 latents (patch 2: 4096 tokens); SANA 32x DC-AE -> 32x32
# latents (1024 tokens); both 300 text tokens.
SHAPES = {"pixart": dict(latent=(4, 128, 128), text_tokens=300), "sana": dict(latent=(32, 32, 32), text_tokens=300)}
TINY_SHAPES = {"pixart": dict(latent=(4, 32, 32), text_tokens=64), "sana": dict(latent=(32, 16, 16), text_tokens=64)}


def build_dit(family: str, tiny: bool):
    """(module, inputs(rows, text_rows), call) as nag_jax.bench.build returns them. A step is the
    transformer's step part: the text part (caption projection, every block's keys and values)
    runs once per sampling run (`text_part_flops`); the step reads its output, `inputs(...)["text"]`."""
    config = TINY_CONFIGS[family] if tiny else {"pixart": PIXART_SIGMA_CONFIG, "sana": SANA_1600M_CONFIG}[family]
    shapes = (TINY_SHAPES if tiny else SHAPES)[family]
    module = (PixArtTransformer if family == "pixart" else SanaTransformer).from_config(config)
    text_part, step_part = module.parts()
    spec, f32 = jax.ShapeDtypeStruct, jnp.float32

    def inputs(rows, text_rows):
        tokens = shapes["text_tokens"]
        caption = dict(context=spec((text_rows, tokens, config["caption_channels"]), f32),
                       context_mask=spec((text_rows, tokens), f32))
        text = jax.eval_shape(lambda c: text_part.init_with_output(jax.random.key(0), **c)[0], caption)
        return dict(x=spec((rows, *shapes["latent"]), f32), timestep=spec((rows,), f32), text=text, caption=caption)

    def call(module, params, x):
        return step_part.apply(params, x["x"], x["text"], x["timestep"])

    return module, inputs, call


def small_init_inputs(family: str, x: dict) -> dict:
    """The whole transformer's inputs at one patch of latents (parameter shapes do not depend on the size)."""
    patch = 2 if family == "pixart" else 1
    latents = jax.ShapeDtypeStruct(x["x"].shape[:2] + (patch, patch), jnp.float32)
    return dict(x=latents, timestep=x["timestep"], **x["caption"])


def text_part_flops(module, params, x: dict) -> float:
    """XLA's flop count of the text part on `x["caption"]` (`inputs(...)`), run once per sampling run."""
    text_part = module.parts()[0]
    with unrolled_layers():
        lowered = jax.jit(lambda p, caption: text_part.apply(p, **caption)).lower(params, x["caption"])
    return float(lowered.cost_analysis()["flops"])
