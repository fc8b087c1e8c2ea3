"""A batch job on 2 simulated CPU devices (sharded, batch size 3: padded to 4 rows) makes the images
of single one-device calls."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASE = r"""
import json, sys, tempfile
import jax, numpy as np
from PIL import Image
from nag_jax import NAGPipeline
from nag_jax.batch import run_batch_job

pipe = NAGPipeline.from_pretrained("sd-shapes")
lines = [{"prompt": p, "nag_negative_prompt": "red", "nag_scale": 3.0, "guidance_scale": 1.0,
          "num_inference_steps": 1, "seed": 7 + i} for i, p in enumerate(["a circle", "a square", "a triangle"])]
with tempfile.TemporaryDirectory() as folder:
    run_batch_job(pipe, lines, folder, batch_size=3, progress=False)
    job = [np.asarray(Image.open(f"{folder}/{i:06d}-0.png"), np.int16) for i in range(3)]
single = [np.asarray(pipe(**line, parallel="none").images[0], np.int16) for line in lines]
print(json.dumps({"devices": jax.device_count(), "diff": max(int(np.abs(a - b).max()) for a, b in zip(job, single)),
                  "distinct": int(np.abs(single[0] - single[1]).max())}))
"""


def test_batch_job_on_two_devices_equals_single_calls():
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=2")
    done = subprocess.run([sys.executable, "-c", CASE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2
    assert result["diff"] <= 1 and result["distinct"] > 20, result  # 8-bit rounding at most; images differ
