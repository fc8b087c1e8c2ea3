"""NAG on Flux at the transformer level: both modes against a PyTorch reference of nag-semantics.md.

The reference is written here on diffusers' FluxTransformer2DModel, following the reference
implementation's structure (section 2): positive and negative text rows run through all
blocks; pooled embeddings are batched [pos; neg] so temb has a negative row; image-stream
modulation uses the positive rows (the reference truncates temb); double blocks keep one
image stream and put NAG on its attention rows; single blocks tile the image into a second
copy modulated by the negative row, overwrite both copies' image rows with the NAG result
after every attention, and keep only the first copy. The guidance function is the L1 one of
section 1.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import AdaLayerNormZero

import tiny_flux
from convert.flux import load_flux_transformer
from nag_jax.intercept import NAGConfig, guided
from torch_nag import torch_nag

SCALE, TAU, ALPHA = 5.0, 2.5, 0.25


def nag_rows(z_pos, z_neg):
    return torch_nag(z_pos, z_neg, SCALE, TAU, ALPHA)


def _heads(attn, x, projections):
    return [p(x).unflatten(-1, (-1, attn.head_dim)) for p in projections]


def _attend(q, k, v, rope):
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


class DoubleBlockNAG:
    """Image rows [B] once, text rows [pos; neg]; image output = NAG(pos branch, neg branch)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        img_q, img_k, img_v = (t.tile(2, 1, 1, 1) for t in _heads(attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v)))
        txt_q, txt_k, txt_v = _heads(attn, encoder_hidden_states, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        q = torch.cat([attn.norm_added_q(txt_q), attn.norm_q(img_q)], dim=1)
        k = torch.cat([attn.norm_added_k(txt_k), attn.norm_k(img_k)], dim=1)
        out = _attend(q, k, torch.cat([txt_v, img_v], dim=1), image_rotary_emb)
        text_tokens, rows = encoder_hidden_states.shape[1], hidden_states.shape[0]
        img_out = nag_rows(out[:rows, text_tokens:], out[rows:, text_tokens:])
        return attn.to_out[0](img_out), attn.to_add_out(out[:, :text_tokens])


class SingleBlockNAG:
    """Rows [copy 1; copy 2] of [text; image]; both copies' image rows get the NAG result."""

    def __init__(self, text_tokens):
        self.text_tokens = text_tokens

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q, k, v = _heads(attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v))
        out = _attend(attn.norm_q(q), attn.norm_k(k), v, image_rotary_emb)
        rows, t = out.shape[0] // 2, self.text_tokens
        combined = nag_rows(out[:rows, t:], out[rows:, t:])
        return torch.cat([out[:, :t], torch.cat([combined, combined], dim=0)], dim=1)


def _image_rows_of_temb(norm, x, emb=None):
    return AdaLayerNormZero.forward(norm, x, emb=emb[: x.shape[0]])


def torch_reference_nag(model, inputs):
    """Flux NAG as the reference computes it; inputs carry [pos; neg] text rows for every image row."""
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    rows = t["hidden_states"].shape[0]
    for block in model.transformer_blocks:
        block.attn.set_processor(DoubleBlockNAG())
        block.norm1.forward = functools.partial(_image_rows_of_temb, block.norm1)
    for block in model.single_transformer_blocks:
        block.attn.set_processor(SingleBlockNAG(t["encoder_hidden_states"].shape[1]))
    with torch.no_grad():
        per_text_row = lambda v: v.tile(2) * 1000  # noqa: E731  the reference expands t and g to the prompt rows
        conditioning = [per_text_row(t["timestep"])] + ([per_text_row(t["guidance"])] if "guidance" in t else [])
        temb = model.time_text_embed(*conditioning, t["pooled_projections"])
        img = model.x_embedder(t["hidden_states"])
        txt = model.context_embedder(t["encoder_hidden_states"])
        rope = model.pos_embed(torch.cat([t["txt_ids"], t["img_ids"]]))
        for block in model.transformer_blocks:
            txt, img = block(img, txt, temb, rope)
        img = img.tile(2, 1, 1)
        for block in model.single_transformer_blocks:
            txt, img = block(img, txt, temb, rope)
        return model.proj_out(model.norm_out(img[:rows], temb[:rows])).numpy()


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


def nag_config(mode, scale=SCALE):
    return NAGConfig(nag_scale=scale, nag_tau=TAU, nag_alpha=ALPHA, nag_mode=mode)


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


def test_reference_mode_matches_the_pytorch_reference(flux):
    """The guided row equals the reference; the unguided (CFG uncond) row is the plain forward."""
    inputs = cfg_and_nag_inputs()
    ours = run(flux, inputs, nag_config("reference"))
    plain = run(flux, positive_rows(inputs))
    ref = torch_reference_nag(tiny_flux.build_model(guidance_embeds=True), cond_row_with_negative(inputs))
    assert tiny_flux.relative_error(plain[1:], ref) > 0.05, "NAG should change the output visibly"
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
