"""NAG on Flux at the transformer level: both modes against the PyTorch reference of
nag-semantics.md (torch_flux_nag.py, written on diffusers' FluxTransformer2DModel)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_flux
from convert.flux import load_flux_transformer
from nag_jax.intercept import NAGConfig, guided
from torch_flux_nag import reference_nag_forward

SCALE, TAU, ALPHA = 5.0, 2.5, 0.25


def torch_reference_nag(model, inputs, norm="l1"):
    """The reference on numpy inputs carrying [pos; neg] text rows for every image row."""
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    return reference_nag_forward(model, SCALE, TAU, ALPHA, **tensors, norm=norm).numpy()


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(diffusers transformer/ folder, our module, params) of a tiny dev model."""
    folder = tmp_path_factory.mktemp("flux_nag") / "transformer"
    tiny_flux.save_sharded(tiny_flux.build_model(guidance_embeds=True), folder)
    module, params = load_flux_transformer(folder)
    return folder, module, params


def run(flux, inputs, config=None):
    _, module, params = flux
    if config is None:
        return np.asarray(module.apply({"params": params}, **inputs))
    with guided(config):
        return np.asarray(module.apply({"params": params}, **inputs))


def nag_config(mode, scale=SCALE, norm="l1"):
    return NAGConfig(nag_scale=scale, nag_tau=TAU, nag_alpha=ALPHA, nag_mode=mode, nag_norm=norm)


def cfg_and_nag_inputs(same_pooled=False, seed=0):
    """Rows [uncond, cond] (as with CFG) and one negative prompt, for the cond row: text rows
    [uncond, cond, negative]. Every test uses these shapes: eager dispatch then compiles once."""
    inputs = tiny_flux.make_inputs(rows=2, text_rows=3, seed=seed, guidance=True)
    if same_pooled:
        inputs["pooled_projections"][2] = inputs["pooled_projections"][1]
    return inputs


def positive_rows(inputs):
    return {**inputs, **{k: inputs[k][:2] for k in ("encoder_hidden_states", "pooled_projections")}}


def cond_row_with_negative(inputs):
    """The cond row alone with its negative prompt: what the reference runs."""
    picked = {k: inputs[k][1:] for k in ("hidden_states", "timestep", "guidance", "encoder_hidden_states", "pooled_projections")}
    return {**inputs, **picked}


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_reference_mode_matches_the_pytorch_reference(flux, norm):
    """The guided row equals the reference (nag_norm="l2": the reference's own Flux processors);
    the unguided (CFG uncond) row is the plain forward."""
    inputs = cfg_and_nag_inputs()
    ours = run(flux, inputs, nag_config("reference", norm=norm))
    plain = run(flux, positive_rows(inputs))
    ref = torch_reference_nag(tiny_flux.build_model(guidance_embeds=True), cond_row_with_negative(inputs), norm)
    other_norm = torch_reference_nag(tiny_flux.build_model(guidance_embeds=True), cond_row_with_negative(inputs),
                                     {"l1": "l2", "l2": "l1"}[norm])
    assert tiny_flux.relative_error(plain[1:], ref) > 0.05, "NAG should change the output visibly"
    assert tiny_flux.relative_error(other_norm, ref) > 1e-3, "the norms should be told apart"
    assert tiny_flux.relative_error(ours[1:], ref) <= 1e-4
    assert tiny_flux.relative_error(ours[:1], plain[:1]) <= 1e-5


def test_shared_image_equals_reference_when_the_pooled_embeddings_agree(flux):
    inputs = cfg_and_nag_inputs(same_pooled=True)
    reference = run(flux, inputs, nag_config("reference"))
    assert tiny_flux.relative_error(run(flux, inputs, nag_config("shared-image")), reference) <= 1e-5


def test_shared_image_differs_from_reference_when_the_pooled_embeddings_differ(flux):
    inputs = cfg_and_nag_inputs()
    plain = run(flux, positive_rows(inputs))[1:]
    reference = run(flux, inputs, nag_config("reference"))[1:]
    shared = run(flux, inputs, nag_config("shared-image"))[1:]
    mode_gap, nag_effect = tiny_flux.relative_error(shared, reference), tiny_flux.relative_error(reference, plain)
    print(f"\nFlux NAG, shared-image vs reference: max |diff| = {mode_gap:.4f} of the output scale "
          f"(NAG itself moves the output by {nag_effect:.4f})")
    assert 1e-4 < mode_gap < nag_effect


@pytest.mark.parametrize("mode", ["shared-image", "reference"])
def test_nag_off_is_the_plain_forward(flux, mode):
    inputs = cfg_and_nag_inputs()
    plain = run(flux, positive_rows(inputs))
    for config in (nag_config(mode, scale=1.0), nag_config(mode)):  # off, or no negative rows
        np.testing.assert_array_equal(run(flux, positive_rows(inputs), config), plain)
    # a negative row given but nag_scale = 1: it flows through the text stream and changes nothing
    assert tiny_flux.relative_error(run(flux, inputs, nag_config(mode, scale=1.0)), plain) <= 1e-5


def test_unknown_mode_is_refused(flux):
    with pytest.raises(ValueError, match="nag_mode must be one of"):
        run(flux, cfg_and_nag_inputs(), nag_config("two-images"))
