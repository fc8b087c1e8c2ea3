"""NAG on the Wan transformer equals the PyTorch reference of tests/torch_wan_nag.py (text
cross-attention only; I2V image attention added after the combination)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from convert.wan import load_wan_transformer
from nag_jax.intercept import NAGConfig, guided
from tests.test_wan import _inputs
from tests.tiny_wan import save_tiny_wan_transformer
from torch_wan_nag import install_nag, nag_forward

NAG = dict(nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25)  # paper Table 5, Wan2.1


@pytest.fixture(scope="module", params=[False, True], ids=["t2v", "i2v"])
def loaded(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan")
    model = save_tiny_wan_transformer(folder, request.param, seed=5)
    module, params = load_wan_transformer(folder)
    install_nag(model, **{k.removeprefix("nag_"): v for k, v in NAG.items()})
    return request.param, model, module, params


def _guided(config, module, params, *inputs):
    with guided(config):
        return np.asarray(jax.jit(lambda *args: module.apply(*args))({"params": params}, *inputs))


def _reference(model, latents, timestep, text, image):
    with torch.no_grad():
        args = [torch.from_numpy(a) for a in (latents, timestep, text)]
        return nag_forward(model, *args, None if image is None else torch.from_numpy(image)).numpy()


def relative_error(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def test_nag_matches_reference(loaded):
    """Two video rows, text [pos; pos; neg; neg]: every row guided."""
    image_to_video, model, module, params = loaded
    latents, timestep, positive, image = _inputs(image_to_video, seed=1)
    negative = _inputs(image_to_video, seed=2)[2]
    text = np.concatenate([positive, negative])
    want = _reference(model, latents, timestep, text, image)
    got = _guided(NAGConfig(**NAG), module, params, latents, timestep, text, image)
    assert relative_error(got, want) <= 1e-4
    plain = np.asarray(jax.jit(module.apply)({"params": params}, latents, timestep, positive, image))
    assert relative_error(plain, want) > 1e-2  # NAG moved the output far beyond the tolerance

    # A negative equal to the prompt is NAG off.
    same = _guided(NAGConfig(**NAG), module, params, latents, timestep, np.concatenate([positive, positive]), image)
    assert relative_error(same, plain) <= 1e-5


def test_nag_with_cfg_layout_leaves_uncond_rows_alone(loaded):
    """Video [uncond; cond], text [uncond; cond; neg]: only the cond row is guided."""
    image_to_video, model, module, params = loaded
    latents, _, text, image = _inputs(image_to_video, seed=3)
    negative = _inputs(image_to_video, rows=1, seed=4)[2]
    timestep = np.array([700.0, 700.0], np.float32)
    if image is not None:
        image = np.concatenate([image[1:], image[1:]])  # CFG rows share the image
    full_text = np.concatenate([text, negative])
    want = _reference(model, latents, timestep, full_text, image)
    got = _guided(NAGConfig(**NAG), module, params, latents, timestep, full_text, image)
    assert relative_error(got, want) <= 1e-4
    plain = np.asarray(jax.jit(module.apply)({"params": params}, latents, timestep, text, image))
    assert relative_error(got[:1], plain[:1]) <= 1e-5
    assert relative_error(got[1:], plain[1:]) > 1e-2
