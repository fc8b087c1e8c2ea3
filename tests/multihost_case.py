"""One of two local CPU processes (see test_multidevice.py): `python multihost_case.py ID PORT`.

With ID >= 0 it joins a two-process JAX cluster whose coordinator is 127.0.0.1:PORT (one CPU
device each, gloo collectives) and runs the sampler's sharded path on a toy denoiser; with
ID -1 it runs the same on one device. Prints the final latents' checksum as JSON.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

process_id, port = int(sys.argv[1]), sys.argv[2]
if process_id >= 0:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU needs it; TPU/GPU do not
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

from nag_jax.sampler import Conditioning, GuidancePlan, Sampler, Scales  # noqa: E402
from nag_jax.schedulers import make_schedule  # noqa: E402

schedule = make_schedule({"_class_name": "EulerAncestralDiscreteScheduler", "beta_schedule": "scaled_linear",
                          "beta_start": 0.00085, "beta_end": 0.012}, 3)


def denoise(params, sample, timestep, conditioning):
    return sample * params["w"] + conditioning.text["context"].mean(axis=(1, 2))[:, None, None, None] * 0.01


rows = 4
keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(rows))
latents = np.random.default_rng(0).standard_normal((rows, 4, 8, 8)).astype(np.float32)
groups = {"cond": Conditioning(text={"context": np.arange(rows * 6, dtype=np.float32).reshape(rows, 2, 3)})}
out = Sampler(denoise)(schedule, GuidancePlan(), {"w": np.float32(0.5)}, latents, groups, Scales(), keys,
                       parallel="sharded" if process_id >= 0 else "none")
print(json.dumps({"devices": jax.device_count(), "processes": jax.process_count(), "latents": np.asarray(out).tolist()}))
