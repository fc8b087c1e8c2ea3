"""The Wan transformers in the benchmarks (`python -m nag_jax.bench --family wan-14b`).

Published configurations (Wan-AI/Wan2.1-T2V-1.3B-Diffusers and -14B-Diffusers,
transformer/config.json) at 480x832, 81 frames: latents 16 x 21 x 60 x 104, patch (1, 2, 2)
-> 21 x 30 x 52 = 32,760 video tokens, 512 UMT5 tokens of width 4096. Wan2.2-TI2V-5B
(Wan-AI/Wan2.2-TI2V-5B-Diffusers: 30 blocks, 24 heads x 128, FFN 14336, 48 latent channels) at
its published 704x1280, 121 frames: the 16x VAE gives latents 48 x 31 x 44 x 80 -> 31 x 22 x 40
= 27,280 tokens, each with its own timestep as diffusers' expand_timesteps runs it. `step_memory` is XLA's
memory analysis of one compiled bf16 denoiser step (abstract shapes, nothing allocated).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from models.wan import WanTransformer3DModel

_WAN_COMMON = {"patch_size": [1, 2, 2], "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
               "attention_head_dim": 128, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6}
WAN_CONFIGS = {
    "wan-1.3b": {**_WAN_COMMON, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    "wan-14b": {**_WAN_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
    # Wan2.2 A14B: each expert is a Wan2.1-14B transformer (T2V-A14B's config is wan-14b's); the
    # I2V experts take 36 channels (latents, 4 mask channels, the first frame's latents), no CLIP tokens.
    "wan2.2-i2v-a14b": {**_WAN_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40, "in_channels": 36},
    "wan2.2-ti2v-5b": {**_WAN_COMMON, "in_channels": 48, "out_channels": 48, "num_attention_heads": 24,
                       "ffn_dim": 14336, "num_layers": 30},
    "wan-tiny": {**_WAN_COMMON, "num_attention_heads": 2, "attention_head_dim": 32, "text_dim": 64, "ffn_dim": 128,
                 "num_layers": 2},
}
REAL_SHAPE = dict(latent=(16, 21, 60, 104), text_tokens=512)  # 480x832, 81 frames
TI2V_SHAPE = dict(latent=(48, 31, 44, 80), text_tokens=512)  # 704x1280, 121 frames
PER_TOKEN_TIMESTEPS = ("wan2.2-ti2v-5b",)
TINY_SHAPE = dict(latent=(16, 2, 4, 4), text_tokens=8)


def build_wan(family: str, tiny: bool, dtype=jnp.float32):
    """(module, inputs(rows, text_rows) -> dict of ShapeDtypeStruct, call) as bench.build gives them."""
    config = WAN_CONFIGS["wan-tiny" if tiny else family]
    shape = TINY_SHAPE if tiny else TI2V_SHAPE if family in PER_TOKEN_TIMESTEPS else REAL_SHAPE
    module = WanTransformer3DModel.from_config(config, dtype=dtype, param_dtype=dtype)
    spec = jax.ShapeDtypeStruct
    _, frames, height, width = shape["latent"]
    timesteps = (frames * (height // 2) * (width // 2),) if family in PER_TOKEN_TIMESTEPS else ()

    def inputs(rows, text_rows):
        latent = (config["in_channels"], *shape["latent"][1:])
        return dict(hidden_states=spec((rows, *latent), dtype), timestep=spec((rows, *timesteps), jnp.float32),
                    encoder_hidden_states=spec((text_rows, shape["text_tokens"], config["text_dim"]), dtype))

    def call(module, params, x):
        return module.apply(params, **x)

    return module, inputs, call


def small_init_inputs(x: dict) -> dict:
    """The inputs with one patch of video and one timestep: parameter shapes do not depend on them."""
    channels = x["hidden_states"].shape[1]
    return dict(x, hidden_states=jax.ShapeDtypeStruct((1, channels, 1, 2, 2), x["hidden_states"].dtype),
                timestep=jax.ShapeDtypeStruct((1,), jnp.float32))


def step_memory(family: str = "wan-14b", context=None) -> dict:
    """XLA's memory analysis (bytes) of one compiled bf16 step of one video row at 480p, 81
    frames, with the negative text row under `context` (NAG) when given."""
    from nag_jax.bench import step_function

    module, inputs, call = build_wan(family, tiny=False, dtype=jnp.bfloat16)
    x = inputs(1, 2 if context else 1)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), **jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), small_init_inputs(inputs(1, 1)))))
    step = step_function(call, module, context or contextlib.nullcontext)
    analysis = jax.jit(step).lower(params, x).compile().memory_analysis()
    return {"arguments": int(analysis.argument_size_in_bytes), "outputs": int(analysis.output_size_in_bytes),
            "temporaries": int(analysis.temp_size_in_bytes)}
