"""NAG on the SD3 transformer equals a PyTorch reference built on diffusers' own modules.

The reference follows nag-semantics.md: the text stream carries [pos; neg] rows through every
block, the pooled embedding is batched [pos; neg] so temb has a negative row, the image
stream (and the final norm) is modulated by the positive rows, and after every joint
attention the image rows get the NAG combination of z_pos (image queries over
[image; text_pos]) and z_neg (over [image; text_neg]), before the output projection. The
MMDiT-X image self-attention (attn2) is left alone.
"""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from convert.sd3 import load_sd3_transformer
from nag_jax.intercept import NAGConfig, guided
from tests.tiny_sd3 import build_model, sample_inputs, save_diffusers

NAG = dict(nag_scale=5.0, nag_tau=2.5, nag_alpha=0.125)  # paper Table 5, SD3.5-Large


def torch_nag(z_pos, z_neg, scale, tau, alpha):
    """nag-semantics.md section 1, written directly."""
    guided_value = scale * z_pos - (scale - 1) * z_neg
    ratio = guided_value.abs().sum(-1, keepdim=True) / z_pos.abs().sum(-1, keepdim=True)
    shrunk = guided_value * torch.clamp(ratio, max=tau) / ratio
    return alpha * shrunk + (1 - alpha) * z_pos


class NAGJointAttnProcessor:
    """Joint attention where text row j attends with the image row it belongs to (extra text
    rows belong to the last image rows) and the image rows of guided samples get NAG."""

    def __init__(self, scale, tau, alpha):
        self.args = (scale, tau, alpha)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        rows, extra = hidden_states.shape[0], encoder_hidden_states.shape[0] - hidden_states.shape[0]
        image_of_text_row = torch.cat([torch.arange(rows), torch.arange(rows - extra, rows)])

        def heads(x):
            return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        q, k, v = (heads(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        txt_q, txt_k, txt_v = (heads(p(encoder_hidden_states)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
            txt_q, txt_k = attn.norm_added_q(txt_q), attn.norm_added_k(txt_k)
        joint = [torch.cat([image[image_of_text_row], text], dim=2) for image, text in ((q, txt_q), (k, txt_k), (v, txt_v))]
        out = F.scaled_dot_product_attention(*joint).transpose(1, 2).flatten(2)
        image_tokens = hidden_states.shape[1]
        img_out, txt_out = out[:rows, :image_tokens], out[:, image_tokens:]
        if extra:
            z_neg = out[rows:, :image_tokens]
            img_out = torch.cat([img_out[: rows - extra], torch_nag(img_out[rows - extra :], z_neg, *self.args)])
        img_out = attn.to_out[0](img_out)
        return img_out, (txt_out if attn.context_pre_only else attn.to_add_out(txt_out))


def reference_nag_forward(model, latents, text, pooled, timestep):
    """diffusers' SD3Transformer2DModel with NAG processors; image-side norms use the positive
    temb rows; each text row gets the timestep of its image row. Patches a copy of `model`."""
    model = copy.deepcopy(model)
    rows, extra = latents.shape[0], text.shape[0] - latents.shape[0]
    image_of_text_row = np.concatenate([np.arange(rows), np.arange(rows - extra, rows)])

    for block in model.transformer_blocks:
        block.attn.set_processor(NAGJointAttnProcessor(NAG["nag_scale"], NAG["nag_tau"], NAG["nag_alpha"]))
        norm1 = block.norm1.forward  # called as norm1(x, emb=temb)
        block.norm1.forward = lambda x, emb, norm1=norm1: norm1(x, emb=emb[: x.shape[0]])
    norm_out = model.norm_out.forward  # called as norm_out(x, temb)
    model.norm_out.forward = lambda x, emb: norm_out(x, emb[: x.shape[0]])
    with torch.no_grad():
        args = (latents, text, pooled, timestep[image_of_text_row])
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
