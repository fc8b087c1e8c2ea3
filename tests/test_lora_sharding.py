"""Merging a LoRA into parameters split over devices (model_parallel) keeps every parameter's
sharding, and merges into one layer of a stacked parameter (in place after the first): one
subprocess with 4 simulated CPU devices (XLA_FLAGS must be set before JAX starts)."""

import os
import subprocess
import sys
from pathlib import Path

CASE = """
import jax, numpy as np
from jax.sharding import Mesh
from convert.lora import LoraLayer, Target
from nag_jax.lora import merge_layer
from nag_jax.sharding import shard_params
mesh = Mesh(np.array(jax.devices()).reshape(1, 4), ("data", "model"))
rng = np.random.default_rng(0)
flat = shard_params({"q/kernel": rng.standard_normal((256, 512), np.float32),
                     "k/kernel": rng.standard_normal((256, 512), np.float32),
                     "v/kernel": rng.standard_normal((256, 512), np.float32),
                     "stack/kernel": rng.standard_normal((4, 256, 256), np.float32)}, mesh)
before = {path: leaf.sharding for path, leaf in flat.items()}
base = {path: np.asarray(leaf) for path, leaf in flat.items()}
fused = LoraLayer("denoiser", "qkv", rng.standard_normal((8, 256), np.float32),
                  rng.standard_normal((1536, 8), np.float32), 8.0, "qkv")
qkv = [Target(path, None, "fused_qkv_linear", part) for part, path in enumerate(("q/kernel", "k/kernel", "v/kernel"))]
merge_layer(flat, fused, qkv, 0.5)
layer = LoraLayer("denoiser", "block", rng.standard_normal((8, 256), np.float32),
                  rng.standard_normal((256, 8), np.float32), 4.0, "block")
owned = set()
merge_layer(flat, layer, [Target("stack/kernel", 2, "linear", 0)], 1.0, owned)
merge_layer(flat, layer, [Target("stack/kernel", 0, "linear", 0)], -1.0, owned)  # into the array just made
assert len(jax.devices()) == 4 and not before["q/kernel"].is_fully_replicated
for path, leaf in flat.items():
    assert leaf.sharding == before[path], (path, leaf.sharding, before[path])
delta = 0.5 * (fused.up @ fused.down).T  # alpha / rank = 1
np.testing.assert_allclose(np.asarray(flat["k/kernel"]), base["k/kernel"] + delta[:, 512:1024], atol=1e-4)
stacked = np.asarray(flat["stack/kernel"])
np.testing.assert_allclose(stacked[2], base["stack/kernel"][2] + 0.5 * (layer.up @ layer.down).T, atol=1e-4)
np.testing.assert_allclose(stacked[0], base["stack/kernel"][0] - 0.5 * (layer.up @ layer.down).T, atol=1e-4)
assert np.array_equal(stacked[[1, 3]], base["stack/kernel"][[1, 3]])
print("ok")
"""


def test_merge_keeps_the_sharding_of_split_parameters():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", CASE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
