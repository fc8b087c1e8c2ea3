"""Benchmarks for NAG's cost: FLOPs per denoiser step, per-step timing, sampler compile time.

    python -m nag_jax.bench                      # everything, human-readable table
    python -m nag_jax.bench --only flops --json  # one part, machine-readable
    python -m nag_jax.bench --family flux        # one family

Parts:
- flops: XLA's cost analysis of one denoiser step at the published full-size configurations
  (SDXL base UNet, FLUX.1-schnell, SD3.5-Large at 1024x1024), traced on abstract shapes only:
  parameters are `jax.eval_shape` results, so no real-size weights are ever allocated. The
  count is taken from the un-compiled lowering (`Lowered.cost_analysis`), which matches the
  compiled program's count on dot-product work and avoids compiling 10-billion-parameter
  graphs on a CPU. `--tiny` counts the small timing configurations instead (fast).
- timing: one denoiser step on small random models, jitted nag-jax beside the diffusers
  PyTorch eager model holding the same weights (needs torch and diffusers, the test extra).
  Variants run interleaved, round-robin, and the median is reported. Each timing records the
  1-minute load average; above QUIET_LOAD it is marked "UNDER LOAD", not judged: other jobs
  starve one side more than the other.
- pipeline: one whole warm call (encode, 20 steps with CFG, decode) of the embedded sd-shapes
  model, nag-jax beside diffusers' StableDiffusionPipeline, interleaved (nag_jax/bench_pipeline.py).
- profile: shares of a small step's XLA:CPU op time (attention core, convolutions, norms, the
  rest) from a `jax.profiler` trace (nag_jax/bench_profile.py).
- compile: the whole sampler (`NAGPipeline`, CFG and NAG on) on a tiny random SD1.5-like
  pipeline built from nag-jax's own modules, at 4, 25 and 50 steps: first call minus second
  call of a fresh pipeline, interleaved over repetitions, median.
- invariant: seconds per compiled call of that pipeline with `batch_invariant` off and on
  (1 and 4 images, CFG and NAG on), interleaved over repetitions, median.
- memory: temporary memory of one attention call and of a Flux-dev step with NAG from XLA's
  memory analysis, before and after blockwise attention, and of a bf16 Wan2.1-1.3B / -14B step
  at 480p, 81 frames, with and without NAG (nag_jax/bench_memory.py).
- gpu (only with `--only gpu`): per-step latency at the published configurations on the
  accelerator, per attention backend, beside the paper's Table 4 (nag_jax/bench_gpu.py);
  `--tiny` runs it on the small configurations on any device.
- vae-memory: XLA's memory analysis of the Wan2.1 VAE (bfloat16, abstract parameters) decoding
  17, 41 and 81 frames at 480x832 and encoding 81: the working memory is the same at every length.
- depth: compile time of the Flux and SD3 transformers against depth, blocks under scan and
  unrolled (nag_jax/bench_depth.py).

XLA's cost analysis counts a loop body once, so the FLOP counts trace the models with their
scanned blocks unrolled (`models.layers.unrolled_layers`: the same computation).

"NAG reference layout" is what the PyTorch reference computes: every negative-branch attention
over the full concatenated keys [negative text; image] (image queries, keys and values repeated
for the negative rows) and, for Flux, the image stream copied for the single-stream blocks.
It is built here from nag-jax's models with one extra interceptor, so it is counted by the same
cost analysis as everything else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.chroma import ChromaTransformer2DModel
from models.flux import FluxTransformer2DModel
from models.layers import JointAttentionCore, unrolled_layers
from models.sd3 import SD3Transformer
from models.unet import UNet2DConditionModel
from nag_jax.attention import attention_backend
from nag_jax.bench_depth import DEPTHS, depth_figures
from nag_jax.bench_dit import DIT_FAMILIES, build_dit, small_init_inputs, text_part_flops
from nag_jax.intercept import NAGConfig, apply_to_last_rows, guided

FAMILIES = ("unet", "flux", "sd3", "kontext", "chroma") + DIT_FAMILIES + ("wan-1.3b", "wan-14b", "wan2.2-i2v-a14b",
                                                                              "wan2.2-ti2v-5b")
TIMED_FAMILIES = ("unet", "flux", "sd3")  # with a diffusers timing comparison; the others: FLOPs only
PARTS = ("flops", "timing", "pipeline", "profile", "compile", "invariant", "vae-memory", "depth", "memory", "gpu")  # "gpu" only when asked for

# Published configurations (diffusers config.json values of the full-size models).
SDXL_UNET_CONFIG = {  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_type": "positional",
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
FLUX_SCHNELL_CONFIG = {  # black-forest-labs/FLUX.1-schnell, transformer/config.json
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}
KONTEXT_CONFIG = {**FLUX_SCHNELL_CONFIG, "guidance_embeds": True}  # FLUX.1-Kontext-dev: FLUX.1-dev's config
CHROMA_CONFIG = {  # lodestones/Chroma1-HD, transformer/config.json
    **{k: FLUX_SCHNELL_CONFIG[k] for k in ("attention_head_dim", "axes_dims_rope", "in_channels", "joint_attention_dim",
                                           "num_attention_heads", "num_layers", "num_single_layers", "patch_size")},
    "approximator_hidden_dim": 5120, "approximator_layers": 5, "approximator_num_channels": 64,
}
SD35_LARGE_CONFIG = {  # stabilityai/stable-diffusion-3.5-large, transformer/config.json
    "attention_head_dim": 64,
    "caption_projection_dim": 2432,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 38,
    "num_layers": 38,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
    "sample_size": 128,
    "dual_attention_layers": [],
}
# Token counts at 1024x1024: latents 128x128 (SDXL 4 channels; SD3 16 channels, patch 2 ->
# 4096 tokens); Flux 4096 packed image tokens and 512 T5 tokens; SD3 77 CLIP + 256 T5 tokens.
REAL_SHAPES = {
    "unet": dict(latent=(4, 128, 128), text_tokens=77),
    "flux": dict(image_tokens=4096, text_tokens=512),
    "sd3": dict(latent=(16, 128, 128), text_tokens=333),
    "kontext": dict(image_tokens=8192, text_tokens=512),  # 4096 generated + 4096 of a 1024x1024 input image
    "chroma": dict(image_tokens=4096, text_tokens=512),
}

# Small configurations for timing on a CPU (and for the fast FLOP count of --tiny).
TINY_UNET_CONFIG = {  # SD1.5-like: conv proj_in/out, CLIP-L-like context narrowed
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 64,
    "norm_num_groups": 8,
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 32,
}
TINY_FLUX_CONFIG = {
    "attention_head_dim": 32,
    "axes_dims_rope": [8, 12, 12],
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 128,
    "num_attention_heads": 4,
    "num_layers": 2,
    "num_single_layers": 4,
    "patch_size": 1,
    "pooled_projection_dim": 64,
}
TINY_SD3_CONFIG = {
    "attention_head_dim": 32,
    "caption_projection_dim": 128,
    "in_channels": 16,
    "joint_attention_dim": 128,
    "num_attention_heads": 4,
    "num_layers": 4,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 32,
    "qk_norm": "rms_norm",
    "sample_size": 32,
}
TINY_KONTEXT_CONFIG = {**TINY_FLUX_CONFIG, "guidance_embeds": True}
TINY_CHROMA_CONFIG = {**{k: v for k, v in TINY_FLUX_CONFIG.items() if k in CHROMA_CONFIG},
                      "approximator_hidden_dim": 64, "approximator_layers": 2, "approximator_num_channels": 16}
TINY_SHAPES = {
    "unet": dict(latent=(4, 32, 32), text_tokens=77),
    "flux": dict(image_tokens=256, text_tokens=64),
    "kontext": dict(image_tokens=512, text_tokens=64),
    "chroma": dict(image_tokens=256, text_tokens=64),
    "sd3": dict(latent=(16, 32, 32), text_tokens=64),
}
NAG = NAGConfig(nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25)
TARGETS = {  # (family, figure) -> upper bound on the relative extra cost
    ("unet", "NAG"): 0.10,
    ("flux", "NAG shared-image"): 0.20,
    ("flux", "NAG reference"): 0.80,
    ("sd3", "NAG"): 0.20,
    ("pixart", "NAG"): 0.03,
    ("sana", "NAG"): 0.03,
    ("wan-1.3b", "NAG"): 0.02,
    ("wan-14b", "NAG"): 0.02,
    ("wan2.2-i2v-a14b", "NAG"): 0.02,
    ("wan2.2-ti2v-5b", "NAG"): 0.02,
}


# -- building models and inputs ------------------------------------------------------------


def build(family: str, tiny: bool):
    """(module, inputs(rows, text_rows) -> dict of ShapeDtypeStruct, call(module, params, inputs))."""
    if family.startswith("wan"):
        from nag_jax.bench_wan import build_wan

        return build_wan(family, tiny)
    if family in DIT_FAMILIES:
        return build_dit(family, tiny)
    configs = {"unet": TINY_UNET_CONFIG, "flux": TINY_FLUX_CONFIG, "sd3": TINY_SD3_CONFIG, "kontext": TINY_KONTEXT_CONFIG,
               "chroma": TINY_CHROMA_CONFIG} if tiny else {
        "unet": SDXL_UNET_CONFIG, "flux": FLUX_SCHNELL_CONFIG, "sd3": SD35_LARGE_CONFIG, "kontext": KONTEXT_CONFIG,
        "chroma": CHROMA_CONFIG}
    shapes = (TINY_SHAPES if tiny else REAL_SHAPES)[family]
    config = configs[family]
    f32 = jnp.float32
    spec = jax.ShapeDtypeStruct
    if family == "unet":
        module = UNet2DConditionModel.from_config(config)
        sdxl = module.config.addition_embed_type == "text_time"

        def inputs(rows, text_rows):
            out = dict(sample=spec((rows, *shapes["latent"]), f32), timesteps=spec((rows,), f32),
                       encoder_hidden_states=spec((text_rows, shapes["text_tokens"], config["cross_attention_dim"]), f32))
            if sdxl:
                text_width = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
                out["added_cond_kwargs"] = {"text_embeds": spec((rows, text_width), f32), "time_ids": spec((rows, 6), f32)}
            return out

        def call(module, params, x):
            return module.apply(params, x["sample"], x["timesteps"], x["encoder_hidden_states"],
                                added_cond_kwargs=x.get("added_cond_kwargs"))
    elif family in ("flux", "kontext", "chroma"):
        chroma = family == "chroma"
        module = (ChromaTransformer2DModel if chroma else FluxTransformer2DModel).from_config(config)
        n, t = shapes["image_tokens"], shapes["text_tokens"]

        def inputs(rows, text_rows):
            out = dict(hidden_states=spec((rows, n, config["in_channels"]), f32),
                       encoder_hidden_states=spec((text_rows, t, config["joint_attention_dim"]), f32),
                       timestep=spec((rows,), f32), img_ids=spec((n, 3), f32), txt_ids=spec((t, 3), f32))
            if chroma:
                return dict(out, attention_mask=spec((text_rows, t), f32))
            out["pooled_projections"] = spec((text_rows, config["pooled_projection_dim"]), f32)
            return dict(out, guidance=spec((rows,), f32)) if config["guidance_embeds"] else out

        def call(module, params, x):
            return module.apply(params, **x)
    elif family == "sd3":
        module = SD3Transformer.from_config(config)

        def inputs(rows, text_rows):
            return dict(hidden_states=spec((rows, *shapes["latent"]), f32),
                        encoder_hidden_states=spec((text_rows, shapes["text_tokens"], config["joint_attention_dim"]), f32),
                        pooled_projections=spec((text_rows, config["pooled_projection_dim"]), f32),
                        timestep=spec((rows,), f32))

        def call(module, params, x):
            return module.apply(params, **x)
    else:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    return module, inputs, call


def _small_init_inputs(family: str, inputs):
    """Concrete zero inputs of a small spatial size: parameter shapes do not depend on it."""
    x = inputs(1, 1)
    if family in DIT_FAMILIES:
        x = small_init_inputs(family, x)
    elif family.startswith("wan"):
        from nag_jax.bench_wan import small_init_inputs as small_wan_inputs

        x = small_wan_inputs(x)
    elif family == "unet":
        x["sample"] = jax.ShapeDtypeStruct(x["sample"].shape[:2] + (8, 8), jnp.float32)
    elif family == "sd3":
        x["hidden_states"] = jax.ShapeDtypeStruct(x["hidden_states"].shape[:2] + (4, 4), jnp.float32)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), x)


def abstract_params(family: str, module, inputs):
    """The parameter tree as ShapeDtypeStructs (nothing allocated)."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), **_small_init_inputs(family, inputs)))


# -- the NAG layouts -----------------------------------------------------------------------


def _full_key_negative_branch(config: NAGConfig):
    """An interceptor giving every joint attention with extra text rows the reference's layout:
    image queries, keys and values repeated for the negative rows, attention over the full
    [text; image] keys for every text row (no shared image-key scores), NAG on the image rows.
    Installed outside `guided`, it runs first, so guided's own transform sees equal batches."""

    def interceptor(next_fun, args, kwargs, context):
        if type(context.module) is not JointAttentionCore or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        txt_q, txt_k, txt_v, img_q, img_k, img_v = args
        rows, extra = img_q.shape[0], txt_q.shape[0] - img_q.shape[0]
        if extra == 0:
            return next_fun(*args, **kwargs)
        image_of_text_row = np.concatenate([np.arange(rows), np.arange(rows - extra, rows)])
        txt_out, img_out = next_fun(txt_q, txt_k, txt_v, *(x[image_of_text_row] for x in (img_q, img_k, img_v)))
        return txt_out, apply_to_last_rows(config, img_out[:rows], img_out[rows:])

    return interceptor


def variants(family: str) -> dict:
    """figure name -> (extra text rows per image row, context manager factory, image rows factor).

    The step is one image row without CFG; "CFG" doubles the rows (context only for scale)."""
    plain = contextlib.nullcontext
    out = {"no NAG": (0, plain, 1), "CFG": (0, plain, 2)}
    if family in ("flux", "kontext"):
        out["NAG shared-image"] = (1, lambda: guided(NAG), 1)
        reference = NAGConfig(NAG.nag_scale, NAG.nag_tau, NAG.nag_alpha, "reference")
        out["NAG reference"] = (1, lambda: guided(reference), 1)
        out["NAG reference layout"] = (1, lambda: _nested(_full_key_negative_branch(reference), reference), 1)
    else:
        out["NAG"] = (1, lambda: guided(NAG), 1)
        if family == "sd3":
            out["NAG reference layout"] = (1, lambda: _nested(_full_key_negative_branch(NAG), NAG), 1)
    return out


@contextlib.contextmanager
def _nested(interceptor, config):
    with nn.intercept_methods(interceptor), guided(config):
        yield


def step_function(call, module, context):
    """A jit-able step whose NAG context is entered while tracing (jit caches traces)."""
    def step(params, x):
        with context():
            return call(module, params, x)
    return step


# -- part 1: FLOPs -------------------------------------------------------------------------


def flop_counts(family: str, tiny: bool = False, progress=None) -> list[dict]:
    """One record per variant: XLA's flop count of one denoiser step (one image). Traced with
    unrolled blocks and one-block ("xla") attention: the cost analysis counts a loop body once,
    so blockwise attention's loops (the default for long sequences) would hide most scores."""
    module, inputs, call = build(family, tiny)
    params = abstract_params(family, module, inputs)
    records, baseline = [], None
    for name, (extra, context, rows) in variants(family).items():
        # XLA counts a loop body once: blocks unrolled, and one-block attention (blockwise loops over key blocks)
        with unrolled_layers(), attention_backend("xla"):
            lowered = jax.jit(step_function(call, module, context)).lower(params, inputs(rows, rows + extra))
        flops = float(lowered.cost_analysis()["flops"])
        baseline = baseline or flops
        records.append(_record("flops", family, name, flops, "GFLOP", baseline, scale=1e-9, tiny=tiny))
        if progress:
            progress.update(1)
    if family in DIT_FAMILIES:  # their caption keys/values: once per sampling run, not per step
        for name, text_rows in (("text part, once per run", 1), ("text part with NAG, once per run", 2)):
            flops = text_part_flops(module, params, inputs(1, text_rows))
            records.append(_record("flops", family, name, flops, "GFLOP", baseline, scale=1e-9, tiny=tiny))
    return records


def _record(part, family, name, value, unit, baseline, scale=1.0, tiny=False):
    ratio = value / baseline
    target = TARGETS.get((family, name)) if part not in ("compile", "depth") else None
    return dict(part=part, family=family, config="tiny" if tiny else "real", name=name, value=value * scale,
                unit=unit, ratio=ratio, target=None if target is None else 1 + target,
                met=None if target is None else bool(ratio <= 1 + target))


QUIET_LOAD = 1.0  # 1-minute load average above which timings are marked as taken under load


def _torch_available() -> str | None:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:
        return f"timing needs torch and diffusers (pip install 'nag-jax[test]'): {error}"
    return None


def _concrete(spec_tree, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), spec_tree)


# -- part 5: Wan VAE memory ------------------------------------------------------------------


def wan_vae_memory_figures(frame_counts=(17, 41, 81), height: int = 480, width: int = 832,
                           progress=None, config: dict | None = None) -> list[dict]:
    """XLA's memory analysis of the compiled Wan VAE (published config: Wan2.1's, or `config`,
    e.g. models.wan_vae.WAN22_VAE; bfloat16 parameters from jax.eval_shape, float32 latents as the
    sampler holds them): temporary (working) memory of decoding each frame count, and of
    encoding the longest. Ratios are against the first."""
    from models.wan_vae import AutoencoderKLWan, WanVAEConfig, decode_video, encode_video

    module = AutoencoderKLWan(WanVAEConfig.from_dict(config or {}), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = jax.eval_shape(module.init, jax.random.key(0), module.init_input())["params"]
    z_dim, spatial, temporal = module.config.z_dim, module.config.spatial_factor, module.config.temporal_factor

    def temp_bytes(function, shape):
        compiled = jax.jit(function).lower(params, jax.ShapeDtypeStruct(shape, jnp.float32)).compile()
        if progress:
            progress.update(1)
        return compiled.memory_analysis().temp_size_in_bytes

    size = f"{height}x{width}"
    decode = {frames: temp_bytes(lambda p, z: decode_video(module, p, z),
                                 (1, z_dim, 1 + (frames - 1) // temporal, height // spatial, width // spatial))
              for frames in frame_counts}
    baseline = decode[frame_counts[0]]
    records = [_record("vae-memory", "wan", f"decode {frames} frames {size} temp", value, "GB", baseline, 1e-9)
               for frames, value in decode.items()]
    longest = frame_counts[-1]
    encode = temp_bytes(lambda p, x: encode_video(module, p, x), (1, 3, longest, height, width))
    return records + [_record("vae-memory", "wan", f"encode {longest} frames {size} temp", encode, "GB", encode, 1e-9)]


# -- the command line ----------------------------------------------------------------------


def environment() -> dict:
    import flax

    info = {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "backend": jax.default_backend(), "cpu": platform.processor() or platform.machine()}
    try:
        import diffusers
        import torch

        info.update(torch=torch.__version__, diffusers=diffusers.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    info["cpu_count"] = os.cpu_count()
    info["load_average"] = round(os.getloadavg()[0], 2)
    return info


def format_table(records: list[dict]) -> str:
    header = ("part", "family", "config", "figure", "value", "ratio", "target", "status")
    rows = [header]
    for r in records:
        ratio = f"{r['ratio']:.3f}x"
        if "vs_pytorch_eager" in r:
            ratio += f" (vs PyTorch {r['vs_pytorch_eager']:.3f}x)"
        if "before" in r:  # memory: the figure of the one-block attention
            ratio += f" of {r['before']:.4g} {r['unit']} before"
        status = "-" if r["met"] is None else ("met" if r["met"] else "MISSED")
        if r.get("load_average", 0) > QUIET_LOAD:
            status = f"UNDER LOAD {r['load_average']:.2f}: not a figure"
        target = "-" if r["target"] is None else f"<= {r['target']:.2f}" + (" " + r["unit"] if "before" in r else "x")
        rows.append((r["part"], r["family"], r["config"], r["name"], f"{r['value']:.4g} {r['unit']}", ratio, target,
                     status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nag-jax bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=PARTS, action="append", help="run only this part (repeatable)")
    parser.add_argument("--family", choices=FAMILIES, action="append", help="only this family (repeatable)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--tiny", action="store_true", help="flops and gpu parts on the small timing configs (fast)")
    parser.add_argument("--repeats", type=int, default=7, help="timing repetitions per variant (median)")
    parser.add_argument("--compile-repeats", type=int, default=3, help="compile-time repetitions (median)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from nag_jax import (bench_gpu, bench_memory, bench_pipeline, bench_profile, bench_sampler,  # they import
                         bench_timing)  # this module
    parts = args.only or [p for p in PARTS if p != "gpu"]
    families = args.family or list(FAMILIES)
    if "gpu" in parts and jax.default_backend() == "cpu" and not args.tiny:
        parser.error("--only gpu needs an accelerator at the published sizes; add --tiny to run it on the CPU")

    missing = _torch_available() if {"timing", "pipeline"} & set(parts) else None
    if missing:
        print(f"skipping the timing and pipeline parts: {missing}", file=sys.stderr)
        parts = [p for p in parts if p not in ("timing", "pipeline")]
    total = (len(parts) and sum(
        len(variants(f)) if p == "flops" else args.repeats * (f in TIMED_FAMILIES) if p == "timing" else 0
        for p in parts for f in families)
        + ("pipeline" in parts and "unet" in families) * args.repeats
        + ("profile" in parts) * sum(f in TIMED_FAMILIES for f in families)
        + ("compile" in parts and "unet" in families) * 3 * args.compile_repeats
        + ("invariant" in parts and "unet" in families) * args.repeats
        + ("vae-memory" in parts) * 4
        + ("depth" in parts) * sum(2 * len(DEPTHS.get(f, ())) for f in families) * args.compile_repeats
        + ("memory" in parts) * (len(bench_memory.ATTENTION_SIZES) + 2 + 2 * len(bench_memory.WAN_STEPS))
        + ("gpu" in parts) * sum(bench_gpu.task_count(f) for f in families))
    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total, desc="nag-jax bench", unit="task", file=sys.stderr)
    records = []
    try:
        for family in families:
            if "flops" in parts:
                records += flop_counts(family, tiny=args.tiny, progress=progress)
            if "timing" in parts and family in TIMED_FAMILIES:
                records += bench_timing.timing_figures(family, args.repeats, progress)
            if "profile" in parts and family in TIMED_FAMILIES:
                records += bench_profile.profile_figures(family, progress=progress)
            if "gpu" in parts:
                records += bench_gpu.gpu_figures(family, tiny=args.tiny, repeats=args.repeats, progress=progress)
        if "pipeline" in parts and "unet" in families:
            records += bench_pipeline.pipeline_figures(repeats=args.repeats, progress=progress)
        if "compile" in parts and "unet" in families:
            records += bench_sampler.compile_figures(repeats=args.compile_repeats, progress=progress)
        if "invariant" in parts and "unet" in families:
            records += bench_sampler.batch_invariant_figures(repeats=args.repeats, progress=progress)
        if "vae-memory" in parts:
            records += wan_vae_memory_figures(progress=progress)
        for family in families:
            if "depth" in parts and family in DEPTHS:
                records += depth_figures(family, args.compile_repeats, progress=progress)
        if "memory" in parts:
            records += bench_memory.memory_figures(progress=progress)
    finally:
        if progress:
            progress.close()
    if args.json:
        print(json.dumps({"environment": environment(), "records": records}, indent=2))
    else:
        print(format_table(records))
        print("\n" + ", ".join(f"{k} {v}" for k, v in environment().items()))
    return 0  # a missed target is a figure to report, not a failure of the command


if __name__ == "__main__":
    sys.exit(main())
