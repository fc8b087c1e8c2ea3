"""Run in a subprocess with 8 simulated CPU devices (see test_multidevice.py); prints JSON.

Kept apart from the test module because XLA_FLAGS must be set before JAX is first imported.
"""

import os
import sys

# 8 simulated devices; LLVM's cheapest optimization level: these tiny programs are compile-bound
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import nag_jax  # noqa: E402
from models.flux import FluxTransformer2DModel  # noqa: E402
from nag_jax import sharding  # noqa: E402
from nag_jax.sampler import make_mesh  # noqa: E402

# Both batches are uneven on 8 devices and pad to the same 8 rows, so the sharded and pmap
# programs compile once for both.
CASES = {"3x1": (["a cat", "a dog", "a bird"], 1), "2x3": (["a cat", "a red car"], 3)}


def run_pipelines(folder):
    """Max abs difference of each parallel mode's final latents from parallel="none", plus
    the per-step callback's (step, latents shape) records."""
    pipe = nag_jax.NAGPipeline.from_pretrained(folder)
    sharding.MIN_SHARDED_SIZE = 4096  # the tiny UNet's weights are small: shard the larger ones anyway
    split = nag_jax.NAGPipeline.from_pretrained(folder, model_parallel=2)
    results = {}
    for name, (prompts, per_prompt) in CASES.items():
        # every guidance at once (CFG, NAG, PAG): each adds row groups the devices must split alike
        args = dict(prompt=prompts, num_images_per_prompt=per_prompt, nag_scale=3.0, nag_negative_prompt="blurry",
                    guidance_scale=7.5, pag_scale=2.0, num_inference_steps=2, height=16, width=16, seed=5,
                    output_type="latent")
        reference = pipe(parallel="none", **args).images
        diffs, calls = {}, {}
        for mode in ("sharded", "pmap"):
            record = calls.setdefault(mode, [])
            callback = lambda step, t, x, record=record: record.append((int(step), list(np.shape(x))))  # noqa: E731
            diffs[mode] = float(np.abs(pipe(parallel=mode, callback_on_step=callback, **args).images - reference).max())
        if name == "3x1":  # data 4 x model 2 mesh, parameters split over `model`
            diffs["model_parallel"] = float(np.abs(split(parallel="sharded", **args).images - reference).max())
        distinct = float(np.abs(reference[0] - reference[-1]).max())  # per-image keys: images differ
        results[name] = {"diffs": diffs, "calls": calls, "images": len(reference), "distinct": distinct,
                         "scale": float(np.abs(reference).max())}
    return results


def run_batch_invariant(folder):
    """batch_invariant=True with CFG, NAG and PAG: whether 3 images (padded to 8 rows) sharded, under
    pmap, and image 0 alone (padded to 8, sharded, with a per-step callback) equal parallel="none"
    bit for bit."""
    pipe = nag_jax.NAGPipeline.from_pretrained(folder)
    args = dict(nag_scale=3.0, nag_negative_prompt="blurry", guidance_scale=7.5, pag_scale=2.0, num_inference_steps=2, height=16,
                width=16, seed=5, output_type="latent", batch_invariant=True)
    prompts = ["a cat", "a dog", "a bird"]
    reference = pipe(prompts, parallel="none", **args).images
    calls = []
    results = {mode: pipe(prompts, parallel=mode, **args).images for mode in ("sharded", "pmap")}
    results["alone sharded"] = pipe(prompts[0], parallel="sharded", callback_on_step=lambda step, t, x: calls.append(
        [int(step), list(np.shape(x))]), **args).images
    return {"equal": {mode: bool(np.array_equal(out, reference[:len(out)])) for mode, out in results.items()},
            "diffs": {mode: float(np.abs(out - reference[:len(out)]).max()) for mode, out in results.items()},
            "distinct": float(np.abs(reference[0] - reference[1]).max()), "calls": calls}


def run_flux_batch_invariant(folder):
    """batch_invariant=True on tiny Flux-dev with true CFG and NAG: whether sharded and pmap equal
    parallel="none" bit for bit (3 images padded to 8 rows)."""
    from tiny_flux_pipeline import MAX_SEQUENCE_LENGTH

    pipe = nag_jax.NAGPipeline.from_pretrained(folder)
    args = dict(true_cfg_scale=2.0, negative_prompt="ugly", nag_scale=5.0, nag_negative_prompt="a dog",
                num_inference_steps=2, height=32, width=32, seed=3, output_type="latent",
                max_sequence_length=MAX_SEQUENCE_LENGTH, batch_invariant=True)
    out = {mode: pipe(["a cat", "a red car", "a bird"], parallel=mode, **args).images
           for mode in ("none", "sharded", "pmap")}
    reference = out.pop("none")
    return {"equal": {mode: bool(np.array_equal(images, reference)) for mode, images in out.items()},
            "diffs": {mode: float(np.abs(images - reference).max()) for mode, images in out.items()},
            "distinct": float(np.abs(reference[0] - reference[1]).max()), "scale": float(np.abs(reference).max())}


def tiny_flux_memory():
    """Total and per-device (model axis of 8) parameter bytes of a small Flux transformer."""
    model = FluxTransformer2DModel.from_config(dict(num_layers=2, num_single_layers=2, attention_head_dim=32,
                                                    num_attention_heads=4, joint_attention_dim=64,
                                                    pooled_projection_dim=32, in_channels=16,
                                                    axes_dims_rope=(8, 12, 12)), param_dtype=jax.numpy.bfloat16)
    zeros = jax.numpy.zeros
    params = jax.eval_shape(model.init, jax.random.key(0), zeros((1, 4, 16)), zeros((1, 3, 64)), zeros((1, 32)),
                            zeros((1,)), zeros((4, 3)), zeros((3, 3)))["params"]
    mesh = make_mesh(8)
    specs = jax.tree.leaves(sharding.param_shardings(params, mesh, min_size=4096))
    expected = sum(sharding.total_bytes([leaf]) // (8 if spec.spec else 1)
                   for leaf, spec in zip(jax.tree.leaves(params), specs))
    return {"total": sharding.total_bytes(params), "per_device": sharding.per_device_bytes(params, mesh, min_size=4096),
            "expected": expected}


if __name__ == "__main__":
    print(json.dumps({"devices": jax.device_count(), "pipelines": run_pipelines(sys.argv[1]),
                      "batch_invariant": run_batch_invariant(sys.argv[1]),
                      "flux_batch_invariant": run_flux_batch_invariant(sys.argv[2]), "memory": tiny_flux_memory()}))
