"""Bench part "memory": temporary memory from XLA's memory analysis, on abstract shapes only.

- one `nag_jax.attention.attention` call on bf16 [1, N, H, D] inputs at the sizes of one
  1024x1024 image (Flux, SD3.5-Large) and one 81-frame Wan2.1 video, with the one-block "xla"
  implementation (what every call was before blockwise attention) and the default ("auto");
- one Flux-dev 1024x1024 denoiser step with NAG in float32 and in bf16 (parameters from
  `jax.eval_shape`); in bf16, XLA:CPU's float32 copies of the weights dominate (BENCHMARKS.md);
- one bf16 Wan2.1-1.3B and -14B denoiser step at 480x832, 81 frames (one video row), without
  guidance and with NAG, under the default backend (`nag_jax.bench_wan.step_memory`): arguments
  (the parameters) and temporaries, which on XLA:CPU are mostly float32 copies of the weights too.

Compiled for the default backend (the CPU here): the figures are XLA's buffer assignment for that
backend. XLA:CPU has no native bf16 slicing inside loops, so the blockwise implementation copies
k and v into uint16 views (2 x N x H x D x 2 bytes) and q one chunk (1/8) at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.flux import FluxTransformer2DModel
from nag_jax.attention import attention, attention_backend, with_attention_backend
from nag_jax.intercept import NAGConfig, guided

GIB = 2**30
# name: (tokens, heads, head dim, acceptance limit of the default backend in GiB)
ATTENTION_SIZES = {
    "Flux 1024^2": (4096 + 512, 24, 128, 0.25),
    "SD3.5-Large 1024^2": (4096 + 333, 38, 64, 0.25),
    "Wan2.1-1.3B 480p 81 frames": (21 * 30 * 52, 12, 128, 1.0),
    "Wan2.1-14B 720p 81 frames": (21 * 45 * 80, 40, 128, 2.0),
}
BEFORE, AFTER = "xla", "auto"
WAN_STEPS = {"wan-1.3b": "Wan2.1-1.3B", "wan-14b": "Wan2.1-14B"}  # bench_wan family: name in the records
GB = 1e9  # the Wan step figures are in GB, as BENCHMARKS.md's earlier 14B figure


def attention_temp_bytes(tokens: int, heads: int, head_dim: int, backend: str) -> int:
    spec = jax.ShapeDtypeStruct((1, tokens, heads, head_dim), jnp.bfloat16)
    compiled = jax.jit(with_attention_backend(attention, backend)).lower(spec, spec, spec).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def flux_dev_step_temp_bytes(backend: str, nag_mode: str = "shared-image", dtype=jnp.bfloat16) -> int:
    """One Flux-dev 1024x1024 step with NAG (one image row, positive and negative text rows)."""
    from nag_jax.bench import FLUX_SCHNELL_CONFIG, REAL_SHAPES

    config = dict(FLUX_SCHNELL_CONFIG, guidance_embeds=True)  # FLUX.1-dev differs from schnell only here
    module = FluxTransformer2DModel.from_config(config, dtype=dtype, param_dtype=dtype)
    n, t = REAL_SHAPES["flux"]["image_tokens"], REAL_SHAPES["flux"]["text_tokens"]
    f32, spec = jnp.float32, jax.ShapeDtypeStruct

    def inputs(text_rows):
        return dict(hidden_states=spec((1, n, config["in_channels"]), dtype),
                    encoder_hidden_states=spec((text_rows, t, config["joint_attention_dim"]), dtype),
                    pooled_projections=spec((text_rows, config["pooled_projection_dim"]), dtype),
                    timestep=spec((1,), f32), img_ids=spec((n, 3), f32), txt_ids=spec((t, 3), f32),
                    guidance=spec((1,), f32))

    params = jax.eval_shape(lambda x: module.init(jax.random.key(0), **x), inputs(1))
    nag = NAGConfig(nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25, nag_mode=nag_mode)

    def step(params, x):
        with attention_backend(backend), guided(nag):
            return module.apply(params, **x)

    return jax.jit(step).lower(params, inputs(2)).compile().memory_analysis().temp_size_in_bytes


def memory_figures(progress=None, with_steps: bool = True) -> list[dict]:
    """Records: temporary GiB before (one score block) and after (default backend), per size; with
    `with_steps`, the whole Flux-dev step's and the Wan steps' (`wan_step_figures`) too."""
    records = []
    for name, (tokens, heads, head_dim, limit) in ATTENTION_SIZES.items():
        before, after = (attention_temp_bytes(tokens, heads, head_dim, b) / GIB for b in (BEFORE, AFTER))
        records.append(dict(part="memory", family="attention", config="real",
                            name=f"{name} ({tokens}, {heads}x{head_dim})", value=after, unit="GiB",
                            ratio=after / before, target=limit, met=after <= limit, before=before))
        if progress:
            progress.update(1)
    for dtype in (jnp.float32, jnp.bfloat16) if with_steps else ():
        before, after = (flux_dev_step_temp_bytes(b, dtype=dtype) / GIB for b in (BEFORE, AFTER))
        records.append(dict(part="memory", family="flux", config="real",
                            name=f"Flux-dev 1024^2 step, NAG, {jnp.dtype(dtype).name}", value=after, unit="GiB",
                            ratio=after / before, target=None, met=None, before=before))
        if progress:
            progress.update(1)
    return records + (wan_step_figures(progress) if with_steps else [])


def wan_step_figures(progress=None) -> list[dict]:
    """Per Wan size: arguments of the NAG step, temporaries without guidance and with NAG (ratio
    against without), in GB, from XLA's memory analysis of the bf16 step (default backend)."""
    from nag_jax.bench import NAG
    from nag_jax.bench_wan import step_memory

    records = []
    for family, label in WAN_STEPS.items():
        plain = step_memory(family)
        nag = step_memory(family, lambda: guided(NAG))
        if progress:
            progress.update(2)
        name = f"{label} 480p 81 frames step, bf16"
        records += [dict(part="memory", family=family, config="real", name=f"{name}, {figure}", value=value / GB,
                         unit="GB", ratio=value / baseline, target=None, met=None)
                    for figure, value, baseline in (
                        ("NAG, arguments (parameters)", nag["arguments"], nag["arguments"]),
                        ("no guidance, temporaries", plain["temporaries"], plain["temporaries"]),
                        ("NAG, temporaries", nag["temporaries"], plain["temporaries"]))]
    return records
