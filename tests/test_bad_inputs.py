"""Every bad input gets one clear error; no checkpoint runs code; bf16 NAG and NaN checks.

On the tiny SD1.5-like pipeline: each bad argument raises exactly one ValueError naming the
argument, the value and what is allowed; each damaged checkpoint raises one error naming what
is wrong; a pickle is read only with the opt-in and then only if it holds nothing but tensors
(a pickle that would run code is refused before anything runs). `check_finite` turns NaN
images into an error, and NAG in bfloat16/float16 keeps a zero-norm attention output finite.
"""

import json
import math
import os
import shutil
import struct

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import nag_jax
from convert.checkpoint import CheckpointError, open_checkpoint
from convert.mapping import ConversionError
from convert.unet import load_unet
from models.layers import CrossAttentionCore
from nag_jax import intercept
from tiny_pipelines import make_sd_pipeline

# One step without CFG: the tests share one compiled NAG program where they can.
FAST = dict(num_inference_steps=1, guidance_scale=1.0, output_type="latent")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_sd_pipeline(tmp_path_factory.mktemp("sd15"), "sd15")


@pytest.fixture(scope="module")
def pipe(folder):
    return nag_jax.NAGPipeline.from_pretrained(folder)


# (call arguments, argument the message must name, text of the value the message must show)
BAD_CALLS = [
    (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "negative_prompt", "3 entries"),
    (dict(prompt=["a", "b", "c"], nag_negative_prompt=["x", "y"]), "nag_negative_prompt", "2 entries"),
    (dict(prompt=[]), "prompt", "[]"),
    (dict(height=31), "height", "31"),
    (dict(width=33), "width", "33"),
    (dict(nag_scale=-0.5), "nag_scale", "-0.5"),
    (dict(nag_scale=math.nan), "nag_scale", "nan"),
    (dict(nag_tau=0.0), "nag_tau", "0.0"),
    (dict(nag_tau=-1.0), "nag_tau", "-1.0"),
    (dict(nag_alpha=-0.1), "nag_alpha", "-0.1"),
    (dict(nag_alpha=1.5), "nag_alpha", "1.5"),
    (dict(nag_end=0.0), "nag_end", "0.0"),
    (dict(nag_end=1.2), "nag_end", "1.2"),
    (dict(nag_norm="L1"), "nag_norm", "'L1'"),
    (dict(num_inference_steps=0), "num_inference_steps", "0"),
    (dict(num_inference_steps=-3), "num_inference_steps", "-3"),
    (dict(num_inference_steps=2.5), "num_inference_steps", "2.5"),
    (dict(batch_invariant="yes"), "batch_invariant", "'yes'"),
]


@pytest.mark.parametrize("arguments,name,value", BAD_CALLS, ids=[f"{n}={v}" for _, n, v in BAD_CALLS])
def test_bad_argument_raises_one_value_error_naming_it(pipe, arguments, name, value):
    arguments = dict(dict(prompt="a cat", nag_scale=3.0, **FAST), **arguments)
    with pytest.raises(ValueError) as error:
        pipe(**arguments)
    assert type(error.value) is ValueError
    message = str(error.value)
    assert message.startswith(name) and value in message, message


@pytest.mark.parametrize(
    "options,name,value,allowed",
    [(dict(scheduler="warp_drive"), "scheduler", "'warp_drive'", "euler"),
     (dict(dtype="float8"), "dtype", "'float8'", "bfloat16"),
     (dict(dtype="fp16"), "dtype", "'fp16'", "float16")],
)
def test_bad_load_option_raises_value_error_naming_it(folder, options, name, value, allowed):
    with pytest.raises(ValueError) as error:
        nag_jax.NAGPipeline.from_pretrained(folder, **options)
    assert type(error.value) is ValueError
    message = str(error.value)
    assert message.startswith(name) and value in message and allowed in message, message


def test_batch_invariant_with_parameters_split_over_devices_is_an_error(pipe):
    split = nag_jax.NAGPipeline(pipe.family, model_parallel=2)
    with pytest.raises(ValueError) as error:
        split("a cat", batch_invariant=True, **FAST)
    assert type(error.value) is ValueError and str(error.value).startswith("batch_invariant=True"), error.value
    assert "model_parallel=2" in str(error.value)


def test_nag_of_a_model_without_nag_transform_is_an_error(pipe, monkeypatch):
    """No registered transform reaches the model's attention: NAG would silently do nothing."""
    monkeypatch.delitem(intercept._TRANSFORMS, (CrossAttentionCore, "__call__"))
    fresh = nag_jax.NAGPipeline(pipe.family)  # the reachability check is cached per pipeline
    with pytest.raises(ValueError) as error:
        fresh("a cat", nag_scale=3.0, **FAST)
    assert type(error.value) is ValueError and str(error.value).startswith("nag_scale = 3.0"), error.value


def test_empty_and_overlong_prompts(pipe):
    """"" is a valid prompt (as in diffusers); a prompt past CLIP's 77 tokens is cut with a warning."""
    empty = pipe("", nag_scale=3.0, **FAST).images
    assert np.isfinite(empty).all()
    with pytest.warns(UserWarning, match="limit of 77 tokens"):
        long = pipe("a cat " * 100, nag_scale=3.0, **FAST).images
    assert np.isfinite(long).all()


# ------------------------------------------------------------------------------ checkpoints


def _unet_copy(folder, tmp_path):
    unet = tmp_path / "unet"
    shutil.copytree(folder / "unet", unet)
    return unet


def _rewrite(unet, edit):
    """Rewrite unet/'s safetensors after `edit(dict of tensors)`."""
    from safetensors.torch import load_file, save_file

    (path,) = unet.glob("*.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_component_folder(folder, tmp_path):
    broken = tmp_path / "pipe"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="component folder vae/"):
        nag_jax.NAGPipeline.from_pretrained(broken)


@pytest.mark.parametrize(
    "fault,expected",
    [
        ("missing key", "missing (1): conv_in/bias"),
        ("extra key", "unexpected (1): not_a_layer.weight"),
        ("wrong shape", "wrong shape: conv_out.bias"),
        ("config does not match", "wrong shape"),
    ],
)
def test_weights_not_matching_the_model(folder, tmp_path, fault, expected):
    unet = _unet_copy(folder, tmp_path)
    if fault == "missing key":
        _rewrite(unet, lambda t: t.pop("conv_in.bias"))
    elif fault == "extra key":
        _rewrite(unet, lambda t: t.update({"not_a_layer.weight": torch.zeros(2)}))
    elif fault == "wrong shape":
        _rewrite(unet, lambda t: t.update({"conv_out.bias": torch.zeros(5)}))
    else:
        config = json.loads((unet / "config.json").read_text())
        config["cross_attention_dim"] *= 2
        (unet / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError) as error:
        load_unet(unet)
    assert expected in str(error.value), error.value


@pytest.mark.parametrize("damage", ["truncated", "header overrun", "garbage header", "empty"])
def test_damaged_safetensors(folder, tmp_path, damage):
    unet = _unet_copy(folder, tmp_path)
    (path,) = unet.glob("*.safetensors")
    data = path.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "header overrun":
        data = struct.pack("<Q", len(data) * 2) + data[8:]
    elif damage == "garbage header":
        header_len = struct.unpack("<Q", data[:8])[0]
        data = data[:8] + b"\xff" * header_len + data[8 + header_len :]
    else:
        data = b""
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as error:
        load_unet(unet)
    assert str(path) in str(error.value) and ("corrupt" in str(error.value) or "not a safetensors" in str(error.value))


class RunsCode:
    """Unpickling this creates a folder: the proof that code ran."""

    def __init__(self, witness):
        self.witness = witness

    def __reduce__(self):
        return os.makedirs, (self.witness,)


def test_pickle_needs_opt_in_and_then_holds_only_tensors(tmp_path):
    witness = str(tmp_path / "code-ran")
    tensors = tmp_path / "tensors.bin"
    torch.save({"w": torch.ones(2, 3)}, tensors)
    malicious = tmp_path / "malicious.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": RunsCode(witness)}, malicious)

    for path in (tensors, malicious):  # without the opt-in: refused before reading
        with pytest.raises(CheckpointError, match="allow_pickle=True"):
            open_checkpoint(path)
    assert open_checkpoint(tensors, allow_pickle=True).load("w").shape == (2, 3)
    with pytest.raises(CheckpointError, match="weights-only loader refused"):
        open_checkpoint(malicious, allow_pickle=True)
    assert not os.path.exists(witness)


# ------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_half_precision_nag_keeps_zero_norm_tokens_finite(dtype, norm):
    """Attention outputs that are exactly zero (positive branch, or both) give finite NAG in
    bf16/fp16, through the interceptor as the pipeline runs it; huge negative values too."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 4, 2, 8)), dtype)
    k = jnp.asarray(rng.standard_normal((2, 5, 2, 8)), dtype)  # rows: positive, NAG negative
    for negative_v in (np.zeros((1, 5, 2, 8)), rng.standard_normal((1, 5, 2, 8)) * 1e4):
        v = jnp.asarray(np.concatenate([np.zeros((1, 5, 2, 8)), negative_v]), dtype)
        config = intercept.NAGConfig(nag_scale=5.0, nag_tau=2.5, nag_alpha=0.5, nag_norm=norm)
        with intercept.guided(config):
            out = CrossAttentionCore().apply({}, q, k, v)
        assert out.dtype == dtype and out.shape == (1, 4, 16)
        # z_pos = 0: the normalized guided output shrinks to 0 (its limit) and (1 - alpha) z_pos is 0
        assert np.isfinite(np.asarray(out, np.float32)).all() and not np.asarray(out, np.float32).any()


def test_check_finite_raises_instead_of_returning_nan_images(pipe):
    latents = np.zeros((1, 4, 16, 16), np.float32)
    latents[0, 0, 3, 5] = np.nan
    arguments = dict(FAST, prompt="a cat", nag_scale=3.0, latents=latents, output_type="np")
    assert np.isnan(pipe(**arguments).images).any()  # what would otherwise reach the user
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        pipe(**arguments, check_finite=True)
