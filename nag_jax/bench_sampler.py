"""Bench parts "compile" (the whole sampler's compile time against the step count) and
"invariant" (the cost of batch_invariant), on a tiny random SD1.5-like pipeline built from
nag-jax's own modules.
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp

from models.unet import UNet2DConditionModel
from nag_jax.bench import TINY_UNET_CONFIG, _record


class _CharTokenizer:
    """A stand-in for the CLIP tokenizer (ids from characters): the compile benchmark needs
    token ids of the right length, not a vocabulary, and so needs no tokenizer files."""

    model_max_length = 77

    def __call__(self, prompts, padding=None, max_length=None, truncation=False):
        ids = [[1] + [2 + ord(c) % 97 for c in p] + [2] for p in prompts]
        if max_length is not None:
            ids = [(i[: max_length - 1] + [2] if len(i) > max_length else i + [0] * (max_length - len(i))) for i in ids]
        return SimpleNamespace(input_ids=ids)


def tiny_sd_pipeline():
    """A NAGPipeline over a tiny random SD1.5-like family built from nag-jax's modules."""
    from models.clip import CLIPTextEncoder
    from models.vae import AutoencoderKL
    from nag_jax.pipeline import NAGPipeline
    from nag_jax.families.unet import StableDiffusionFamily

    unet = UNet2DConditionModel.from_config(dict(TINY_UNET_CONFIG, block_out_channels=[32, 64],
                                                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                                                 sample_size=16))
    clip = CLIPTextEncoder.from_config(dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=2))
    vae = AutoencoderKL.from_config(dict(latent_channels=4, block_out_channels=[8, 16], norm_num_groups=4,
                                         layers_per_block=1))
    key = jax.random.key(0)
    params = {
        "unet": unet.init(key, jnp.zeros((1, 4, 8, 8)), jnp.zeros((1,)), jnp.zeros((1, 77, 64)))["params"],
        "vae": vae.init(key, jnp.zeros((1, 3, 16, 16)))["params"],
        "text_encoders": [clip.init(key, jnp.zeros((1, 77), jnp.int32))["params"]],
    }
    scheduler = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "timestep_spacing": "leading",
                 "steps_offset": 1}
    family = StableDiffusionFamily(unet, vae, [clip], [_CharTokenizer()], params, scheduler,
                                   {"_class_name": "StableDiffusionPipeline"}, 16, jnp.float32)
    return lambda: NAGPipeline(family)


def compile_figures(step_counts=(4, 25, 50), repeats: int = 3, progress=None) -> list[dict]:
    """Compile time of the sampler per step count: a fresh pipeline's first call minus its second."""
    make_pipeline = tiny_sd_pipeline()
    args = dict(prompt="a cat", nag_scale=3.0, guidance_scale=7.5, output_type="latent")
    make_pipeline()(num_inference_steps=2, **args)  # compiles the text encoder once, outside the figures
    compile_s = {n: [] for n in step_counts}
    for _ in range(repeats):
        for n in step_counts:
            pipeline = make_pipeline()
            start = time.perf_counter()
            pipeline(num_inference_steps=n, **args)
            first = time.perf_counter() - start
            start = time.perf_counter()
            pipeline(num_inference_steps=n, **args)
            compile_s[n].append(first - (time.perf_counter() - start))
            if progress:
                progress.update(1)
    medians = {n: statistics.median(v) for n, v in compile_s.items()}
    records = []
    for n, seconds in medians.items():
        record = _record("compile", "unet", f"sampler, {n} steps", seconds, "s", medians[step_counts[0]], tiny=True)
        if n == max(step_counts):
            record["target"], record["met"] = 1.2, bool(record["ratio"] <= 1.2)
        records.append(record)
    return records


# -- part 4: cost of batch_invariant ---------------------------------------------------------


def batch_invariant_figures(pipeline=None, image_counts=(1, 4), steps: int = 4, repeats: int = 5,
                            progress=None) -> list[dict]:
    """Seconds per whole call (encode, sample, decode; compiled beforehand) with batch_invariant
    off and on, CFG and NAG on, interleaved over repetitions, median; `pipeline` defaults to the
    tiny SD1.5-like one."""
    pipeline = pipeline or tiny_sd_pipeline()()
    args = dict(nag_scale=3.0, nag_negative_prompt="blurry", guidance_scale=7.5, num_inference_steps=steps,
                output_type="np")
    variants = [(n, invariant) for n in image_counts for invariant in (False, True)]
    for n, invariant in variants:  # compile
        pipeline(["a cat"] * n, batch_invariant=invariant, **args)
    seconds = {variant: [] for variant in variants}
    for _ in range(repeats):
        for n, invariant in variants:
            start = time.perf_counter()
            pipeline(["a cat"] * n, batch_invariant=invariant, **args)
            seconds[n, invariant].append(time.perf_counter() - start)
        if progress:
            progress.update(1)
    medians = {variant: statistics.median(v) for variant, v in seconds.items()}
    return [_record("invariant", "unet", f"{n} image{'s' * (n > 1)}, {'batch_invariant' if invariant else 'default'}",
                    medians[n, invariant], "s", medians[n, False], tiny=True) for n, invariant in variants]
