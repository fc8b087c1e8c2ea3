"""Wan2.2 A14B's two experts on 8 simulated CPU devices (tests/multidevice_wan22_cases.py in a
subprocess): pmap, a (data 4, model 2) mesh (each expert's stacked parameters
split over `model`, both kept on the devices) and the same mesh with offload_inactive_expert
(only the running expert on the devices) give the latents of one device; batch_invariant is
bit-identical across device counts. The scheduler state crosses from one expert's program to
the other's in every mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_wan import build_tiny_wan_pipeline

TESTS = Path(__file__).parent


def test_two_experts_on_eight_devices(tmp_path):
    build_tiny_wan_pipeline(tmp_path, boundary_ratio=0.875)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    done = subprocess.run([sys.executable, str(TESTS / "multidevice_wan22_cases.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8 and set(result["diffs"]) == {"pmap", "model_parallel"}
    for mode, diff in result["diffs"].items():
        assert diff <= 1e-4 * result["scale"], (mode, diff, result["scale"])
    placement = result["placement"]  # without offloading both experts stay placed, each split in halves
    assert sorted(placement) == ["0", "1"]
    for expert in placement.values():
        assert expert["split"] > 0 and expert["device_0_share"] == pytest.approx(0.5, abs=0.1), placement
    assert result["offload_equal"] and result["batch_invariant_equal"]
    assert result["offload_on_device"] == [[0], [1], [1]] and result["offload_after"] == 0
