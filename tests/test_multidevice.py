"""Multi-device sampling on 8 simulated CPU devices (one subprocess, see multidevice_cases.py).

parallel="sharded" (jit over a data mesh), "pmap", and a (data 4, model 2) mesh with the
parameters split over `model` all give the latents of parallel="none", for batches that do not
divide by the device count, with CFG, NAG, PAG and a stochastic scheduler (every image's noise
comes from its own (seed, image index) key, whatever the layout), to float32 rounding; with
batch_invariant=True bit for bit, image 0 alone too, and Flux with CFG and NAG too. The per-step callback sees each step once,
with the unpadded batch. XLA's memory analysis of a small Flux transformer's
parameters sharded 8 ways gives the expected per-device bytes. Two local processes joined by
jax.distributed (multi-host) sample what one process does.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny_flux_pipeline import make_flux_pipeline
from tiny_pipelines import make_sd_pipeline

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = make_sd_pipeline(tmp_path_factory.mktemp("sd15"), "sd15", scheduler="euler_ancestral")
    flux = make_flux_pipeline(tmp_path_factory.mktemp("flux"), "dev")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    done = subprocess.run([sys.executable, str(TESTS / "multidevice_cases.py"), str(folder), str(flux)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case,images", [("3x1", 3), ("2x3", 6)])
def test_parallel_modes_match_one_device(results, case, images):
    assert results["devices"] == 8
    result = results["pipelines"][case]
    assert result["images"] == images
    assert result["distinct"] > 0.1 * result["scale"]  # images really differ: each has its own noise
    expected_modes = {"sharded", "pmap"} | ({"model_parallel"} if case == "3x1" else set())
    assert set(result["diffs"]) == expected_modes
    for mode, diff in result["diffs"].items():
        assert diff <= 1e-4 * result["scale"], (mode, diff, result["scale"])
    for mode, calls in result["calls"].items():  # once per step, padding rows dropped
        assert calls == [[0, [images, 4, 8, 8]], [1, [images, 4, 8, 8]]], mode


def test_batch_invariant_images_are_bit_identical_across_device_counts(results):
    """batch_invariant=True: 1 device, 8 devices sharded and pmap, and image 0 alone (padded to
    8 rows) give the same latents bit for bit, with CFG, NAG and Euler ancestral."""
    result = results["batch_invariant"]
    assert result["distinct"] > 0.1  # the three images really differ
    assert result["equal"] == {"sharded": True, "pmap": True, "alone sharded": True}, result["diffs"]
    assert result["calls"] == [[0, [1, 4, 8, 8]], [1, [1, 4, 8, 8]]]  # the callback under shard_map: once per step


def test_batch_invariant_flux_with_cfg_and_nag_is_bit_identical_across_device_counts(results):
    """Flux-dev with true CFG and reference-mode NAG (joint attention): 1 device, 8 sharded and
    pmap give the same latents bit for bit. This needed NAG's L1 norms as dot products
    (nag_jax/guidance.py): XLA fused the sums differently in one- and multi-device programs."""
    result = results["flux_batch_invariant"]
    assert result["distinct"] > 0.01 * result["scale"]
    assert result["equal"] == {"sharded": True, "pmap": True}, result["diffs"]


def test_sharded_parameters_take_an_eighth_per_device(results):
    memory = results["memory"]
    assert memory["per_device"] == memory["expected"]  # XLA agrees with the chosen partition specs
    assert memory["per_device"] < memory["total"] / 8 * 1.1  # only small leaves stay replicated


def test_two_processes_with_a_local_coordinator_match_one_process():
    """jax.distributed.initialize on 127.0.0.1: two CPU processes, one device each."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent))
    script = str(TESTS / "multihost_case.py")
    workers = [subprocess.Popen([sys.executable, script, str(i), port], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    single = subprocess.run([sys.executable, script, "-1", port], env=env, capture_output=True, text=True, timeout=300)
    outputs = [worker.communicate(timeout=300) for worker in workers]
    assert single.returncode == 0 and all(w.returncode == 0 for w in workers), [e[-2000:] for _, e in outputs]
    reference = json.loads(single.stdout.strip().splitlines()[-1])
    for stdout, _ in outputs:
        result = json.loads(stdout.strip().splitlines()[-1])
        assert (result["devices"], result["processes"]) == (2, 2)
        np.testing.assert_allclose(result["latents"], reference["latents"], rtol=1e-6, atol=1e-6)
