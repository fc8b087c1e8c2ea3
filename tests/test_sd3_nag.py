"""NAG on the SD3 transformer equals a PyTorch reference built on diffusers' own modules.

The reference (tests/torch_sd3_nag.py) follows nag-semantics.md: the text stream carries
[pos; neg] rows through every block with a temb row each, the image stream is modulated by
the positive rows, and the image rows of every joint attention get NAG before the output
projection; the MMDiT-X image self-attention (attn2) is left alone.
"""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
import torch

from convert.sd3 import load_sd3_transformer
from nag_jax.intercept import NAGConfig, guided
from tests.tiny_sd3 import build_model, sample_inputs, save_diffusers
from torch_sd3_nag import image_rows_of_text, install_nag

NAG = dict(nag_scale=5.0, nag_tau=2.5, nag_alpha=0.125)  # paper Table 5, SD3.5-Large


def reference_nag_forward(model, latents, text, pooled, timestep):
    """diffusers' SD3Transformer2DModel with the reference NAG of torch_sd3_nag.py; each text
    row gets the timestep of its image row. Patches a copy of `model`."""
    model = copy.deepcopy(model)
    install_nag(model, NAG["nag_scale"], NAG["nag_tau"], NAG["nag_alpha"])
    with torch.no_grad():
        args = (latents, text, pooled, timestep[image_rows_of_text(len(latents), len(text))])
        return model(*(torch.from_numpy(a) for a in args)).sample.numpy()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """SD3.5-Medium-like (QK-norm and MMDiT-X attn2, which NAG must leave alone)."""
    model = build_model("sd35_medium", seed=3)
    folder = tmp_path_factory.mktemp("sd35_medium")
    save_diffusers(model, folder, sharded=False)
    module, params = load_sd3_transformer(folder)
    return model, module, params, plain_forward(module, params)


def plain_forward(module, params):
    """The unguided forward, jitted once so that equal input shapes compile once."""
    apply = jax.jit(module.apply)
    return lambda *inputs: np.asarray(apply({"params": params}, *inputs))


def guided_apply(config, module, params, *inputs):
    """Traced inside the guided context by a fresh function, so no plain trace is reused."""
    with guided(config):
        return np.asarray(jax.jit(lambda *args: module.apply(*args))({"params": params}, *inputs))


def relative_error(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def test_nag_matches_reference(loaded):
    """Two image rows, text [pos; pos; neg; neg]: every image row is guided."""
    model, module, params, plain = loaded
    latents, positive, pooled_pos, timestep = sample_inputs(batch=2, seed=1)
    _, negative, pooled_neg, _ = sample_inputs(batch=2, seed=2)
    text, pooled = np.concatenate([positive, negative]), np.concatenate([pooled_pos, pooled_neg])
    want = reference_nag_forward(model, latents, text, pooled, timestep)
    got = guided_apply(NAGConfig(**NAG), module, params, latents, text, pooled, timestep)
    assert relative_error(got, want) <= 1e-4
    without_nag = plain(latents, positive, pooled_pos, timestep)
    assert relative_error(without_nag, want) > 1e-2  # the guidance did something the test can see


def test_nag_with_cfg_layout_leaves_uncond_rows_alone(loaded):
    """Image [uncond; cond], text [uncond; cond; neg]: only the cond row is guided."""
    model, module, params, plain = loaded
    latents, text, pooled, _ = sample_inputs(batch=3, seed=4)
    latents, timestep = latents[:2], np.array([700.0, 700.0], np.float32)
    want = reference_nag_forward(model, latents, text, pooled, timestep)
    got = guided_apply(NAGConfig(**NAG), module, params, latents, text, pooled, timestep)
    assert relative_error(got, want) <= 1e-4
    without_nag = plain(latents, text[:2], pooled[:2], timestep)
    assert relative_error(got[:1], without_nag[:1]) <= 1e-5
    assert relative_error(got[1:], without_nag[1:]) > 1e-2


def test_nag_off_is_bit_identical_to_plain(loaded):
    """nag_scale <= 1: exactly the plain forward."""
    _, module, params, plain = loaded
    inputs = sample_inputs(batch=2, seed=5)
    got = guided_apply(NAGConfig(nag_scale=1.0, nag_tau=2.5, nag_alpha=0.125), module, params, *inputs)
    np.testing.assert_array_equal(got, plain(*inputs))
