"""Wan sampling on 8 simulated CPU devices (tests/multidevice_wan_cases.py in a subprocess):
parallel="sharded", "pmap" and a (data 4, model 2) mesh with the transformer's stacked
parameters split over `model` give the latents of parallel="none", with CFG and NAG, for a
batch of 3 videos padded to 8 rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.tiny_wan import build_tiny_wan_pipeline

TESTS = Path(__file__).parent


def test_wan_parallel_modes_match_one_device(tmp_path):
    build_tiny_wan_pipeline(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    done = subprocess.run([sys.executable, str(TESTS / "multidevice_wan_cases.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8 and result["shape"] == [3, 4, 2, 4, 4]
    assert result["distinct"] > 0.1 * result["scale"]  # each video has its own noise
    assert set(result["diffs"]) == {"sharded", "pmap", "model_parallel"}
    for mode, diff in result["diffs"].items():
        assert diff <= 1e-4 * result["scale"], (mode, diff, result["scale"])
