"""Wan2.2 A14B (two experts) on 8 simulated CPU devices (run by test_multidevice_wan22.py in a
subprocess); prints JSON. XLA_FLAGS must be set before JAX is first imported.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import nag_jax  # noqa: E402
from nag_jax import sharding  # noqa: E402


def placement(pipe) -> dict:
    """Per placed expert: the share of its parameter bytes device 0 holds, and how many of its
    arrays are split over the `model` axis."""
    report = {}
    for expert, (_, _, placed, _) in pipe.sampler._placement.items():
        leaves = jax.tree.leaves(placed)
        on_first = sum(shard.data.nbytes for leaf in leaves for shard in leaf.addressable_shards
                       if shard.device == jax.devices()[0])
        report[expert] = {"device_0_share": on_first / sum(leaf.nbytes for leaf in leaves),
                          "split": sum("model" in leaf.sharding.spec for leaf in leaves), "arrays": len(leaves)}
    return report


def run(folder):
    """Max abs difference from parallel="none" of: pmap, a (data 4, model 2) mesh (the sharded
    jit) with and without offload_inactive_expert, and batch_invariant sharded; 3
    videos padded to 8 rows, CFG with guidance_scale_2, NAG cut inside the low-noise steps."""
    sharding.MIN_SHARDED_SIZE = 512  # the tiny transformers' weights are small: shard them anyway
    pipe = nag_jax.NAGPipeline.from_pretrained(folder)
    split = nag_jax.NAGPipeline.from_pretrained(folder, model_parallel=2)
    offloading = nag_jax.NAGPipeline(split.family, model_parallel=2, offload_inactive_expert=True)
    args = dict(prompt=["a cat", "a dog", "a bird"], nag_scale=5.0, nag_negative_prompt="blurry", nag_end=0.2,
                guidance_scale=5.0, guidance_scale_2=2.0, num_inference_steps=3, height=32, width=32, num_frames=5,
                seed=3, output_type="latent")
    reference = pipe(parallel="none", **args).frames
    diff = lambda out: float(np.abs(out - reference).max())  # noqa: E731
    diffs = {"pmap": diff(pipe(parallel="pmap", **args).frames)}  # "sharded" with model 1: the jit path below
    diffs["model_parallel"] = diff(split(parallel="sharded", **args).frames)
    on_device = []
    record = lambda step, t, x: on_device.append(sorted(placement(offloading)))  # noqa: E731
    offloaded = offloading(parallel="sharded", callback_on_step=record, **args).frames
    invariant = pipe(parallel="none", batch_invariant=True, **args).frames
    return {"devices": jax.device_count(), "diffs": diffs, "scale": float(np.abs(reference).max()),
            "offload_equal": bool(np.array_equal(offloaded, split(parallel="sharded", **args).frames)),
            "offload_on_device": on_device, "offload_after": len(offloading.sampler._placement),
            "placement": placement(split),
            "batch_invariant_equal": bool(np.array_equal(
                invariant, pipe(parallel="sharded", batch_invariant=True, **args).frames))}


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1])))
