"""convert_pipeline: a converted folder loads through the same loaders to the same images, and
no conversion, failed or killed midway, leaves a folder that looks valid.

The tiny SDXL-like pipeline covers a sharded UNet, two CLIP encoders (one with projection)
and copied tokenizer and scheduler folders. The kill is a real SIGKILL of a converting
process after its first component is written.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

import nag_jax
from convert.checkpoint import FLAX_PARAMS_FILE, CheckpointError, open_checkpoint
from nag_jax.converted import MARKER_FILE, convert_pipeline, is_converted, save_flat_safetensors
from tiny_pipelines import make_sd_pipeline

ROOT = Path(__file__).resolve().parents[1]

# Converts like the CLI would, but kills itself once the first component's parameters are on disk.
KILLED_MIDWAY = """
import os, signal, sys
import nag_jax.converted as converted
save = converted.save_flat_safetensors
def save_then_die(path, params):
    save(path, params)
    os.kill(os.getpid(), signal.SIGKILL)
converted.save_flat_safetensors = save_then_die
converted.convert_pipeline(sys.argv[1], sys.argv[2], progress=False)
"""


def _partials(dst: Path):
    return sorted(dst.parent.glob(f".{dst.name}.partial-*"))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_sd_pipeline(tmp_path_factory.mktemp("sdxl"), "sdxl")


@pytest.fixture(scope="module")
def killed_then_rerun(src, tmp_path_factory):
    """A conversion killed midway, what it left, then a rerun into the same destination."""
    dst = tmp_path_factory.mktemp("out") / "converted"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    killed = subprocess.run([sys.executable, "-c", KILLED_MIDWAY, str(src), str(dst)], env=env, capture_output=True)
    left = {"returncode": killed.returncode, "dst_exists": dst.exists(), "partials": _partials(dst),
            "partial_files": [p.name for partial in _partials(dst) for p in partial.rglob("*")]}
    try:
        nag_jax.NAGPipeline.from_pretrained(dst)
        left["load_error"] = None
    except FileNotFoundError as error:
        left["load_error"] = error
    convert_pipeline(src, dst, progress=False)
    return left, dst


def test_killed_conversion_leaves_no_valid_folder_and_a_rerun_succeeds(killed_then_rerun):
    left, dst = killed_then_rerun
    assert left["returncode"] == -signal.SIGKILL
    assert not left["dst_exists"] and left["load_error"] is not None
    assert len(left["partials"]) == 1 and FLAX_PARAMS_FILE in left["partial_files"]  # it died with work on disk
    assert MARKER_FILE not in left["partial_files"]
    assert is_converted(dst) and not _partials(dst)  # the rerun cleaned up what the killed run left


def test_converted_folder_layout(killed_then_rerun):
    _, dst = killed_then_rerun
    marker = json.loads((dst / MARKER_FILE).read_text())
    assert marker["components"] == ["text_encoder", "text_encoder_2", "unet", "vae"] and marker["dtype"] == "float32"
    assert sorted(p.name for p in (dst / "unet").iterdir()) == ["config.json", FLAX_PARAMS_FILE]  # shards replaced
    assert (dst / "tokenizer_2" / "vocab.json").exists() and (dst / "scheduler" / "scheduler_config.json").exists()
    unet = open_checkpoint(dst / "unet")
    assert unet.flax_paths and "conv_in/kernel" in unet.keys()


def test_converted_folder_loads_the_same_model(src, killed_then_rerun):
    """Same parameters bit for bit, same modules and scheduler: so the same images (the sampler
    and decoder only see these)."""
    _, dst = killed_then_rerun
    original = nag_jax.NAGPipeline.from_pretrained(src).family
    converted = nag_jax.NAGPipeline.from_pretrained(dst).family
    for name in ("params", "vae_params", "encoder_params"):
        a, b = getattr(original, name), getattr(converted, name)
        assert jax.tree.structure(a) == jax.tree.structure(b)
        assert all(np.array_equal(x, y) and x.dtype == y.dtype for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert (original.unet, original.vae, original.encoders) == (converted.unet, converted.vae, converted.encoders)
    assert original.scheduler_config == converted.scheduler_config


def test_failing_conversion_leaves_nothing(src, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 7)  # converted last
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        convert_pipeline(broken, dst, progress=False)
    assert not dst.exists() and not _partials(dst)


def test_existing_destination_and_missing_source_are_refused(src, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="dst: .*taken already exists"):
        convert_pipeline(src, tmp_path / "taken", progress=False)
    with pytest.raises(FileNotFoundError, match="src: .*nowhere does not exist"):
        convert_pipeline(tmp_path / "nowhere", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="dtype must be one of"):
        convert_pipeline(src, tmp_path / "out", dtype="float64", progress=False)
    assert not (tmp_path / "out").exists()


def test_flat_file_round_trips_every_dtype(tmp_path):
    params = {"block": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
                        "bias": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)},
              "scale": np.array([0.25], dtype=np.float16)}
    path = tmp_path / FLAX_PARAMS_FILE
    assert save_flat_safetensors(path, params) == 3
    checkpoint = open_checkpoint(path)
    assert checkpoint.flax_paths and sorted(checkpoint.keys()) == ["block/bias", "block/kernel", "scale"]
    for key, expected in (("block/kernel", params["block"]["kernel"]), ("block/bias", params["block"]["bias"]),
                          ("scale", params["scale"])):
        loaded = checkpoint.load(key)
        assert loaded.dtype == expected.dtype and np.array_equal(loaded, expected)


def test_single_file_with_template(tmp_path):
    """An SD1.5 LDM single file plus the matching diffusers folder (configs, tokenizer,
    scheduler) converts to a folder holding the same parameters as converting that folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from test_single_file import write_single_file

    template = make_sd_pipeline(tmp_path / "sd15", "sd15")
    single = tmp_path / "sd15.safetensors"
    write_single_file(single, UNet2DConditionModel.from_pretrained(template / "unet"),
                      AutoencoderKL.from_pretrained(template / "vae"),
                      CLIPTextModel.from_pretrained(template / "text_encoder"))
    with pytest.raises(ValueError, match="template: converting the single file"):
        convert_pipeline(single, tmp_path / "out", progress=False)
    dst = convert_pipeline(single, tmp_path / "out", template=template, progress=False)
    from_folder = convert_pipeline(template, tmp_path / "from_folder", progress=False)
    for name in ("unet", "vae", "text_encoder"):
        a, b = open_checkpoint(dst / name), open_checkpoint(from_folder / name)
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(np.array_equal(a.load(key), b.load(key)) for key in a.keys())
    assert json.loads((dst / "unet" / "config.json").read_text()) == json.loads(
        (template / "unet" / "config.json").read_text())
