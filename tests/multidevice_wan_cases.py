"""Wan on 8 simulated CPU devices (run by test_multidevice_wan.py in a subprocess); prints JSON.

XLA_FLAGS must be set before JAX is first imported, hence a separate process.
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


def run(folder):
    """Max abs difference of each parallel mode's final latents from parallel="none" (3 videos,
    padded to 8 rows; CFG and NAG on), and the data 4 x model 2 mesh with split parameters."""
    sharding.MIN_SHARDED_SIZE = 512  # the tiny transformer's weights are small: shard them anyway
    pipe = nag_jax.NAGPipeline.from_pretrained(folder)
    split = nag_jax.NAGPipeline.from_pretrained(folder, model_parallel=2)
    args = dict(prompt=["a cat", "a dog", "a bird"], nag_scale=5.0, nag_negative_prompt="blurry", guidance_scale=5.0,
                num_inference_steps=2, height=32, width=32, num_frames=5, seed=3, output_type="latent")
    reference = pipe(parallel="none", **args).frames
    diffs = {mode: float(np.abs(pipe(parallel=mode, **args).frames - reference).max()) for mode in ("sharded", "pmap")}
    diffs["model_parallel"] = float(np.abs(split(parallel="sharded", **args).frames - reference).max())
    return {"devices": jax.device_count(), "diffs": diffs, "shape": list(reference.shape),
            "scale": float(np.abs(reference).max()), "distinct": float(np.abs(reference[0] - reference[-1]).max())}


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1])))
