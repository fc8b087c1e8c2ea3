"""NAG on the UNet: nag_jax.guided around models.unet equals diffusers' UNet driven by a NAG
attention processor (written here from nag-semantics.md section 1) on the same weights."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from convert.unet import load_unet
from nag_jax import NAGConfig, guided
from tests.tiny_unet import make_inputs, make_unet, torch_forward

SDXL_NAG = NAGConfig(nag_scale=3.0, nag_tau=2.5, nag_alpha=0.5)


class TorchNAGCrossAttention:
    """diffusers attention processor: cross-attention whose context carries extra negative rows
    for the last image rows; NAG combines the two branches' head-merged outputs before to_out."""

    def __init__(self, scale, tau, alpha):
        self.scale, self.tau, self.alpha = scale, tau, alpha

    def _attend(self, attn, query, context):
        def heads(x):
            return x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        z = F.scaled_dot_product_attention(heads(query), heads(attn.to_k(context)), heads(attn.to_v(context)))
        return z.transpose(1, 2).reshape(query.shape[0], -1, query.shape[-1])

    def _nag(self, z_pos, z_neg):
        z_tilde = self.scale * z_pos - (self.scale - 1) * z_neg
        ratio = z_tilde.abs().sum(-1, keepdim=True) / z_pos.abs().sum(-1, keepdim=True)
        z_hat = z_tilde * torch.clamp(ratio, max=self.tau) / ratio
        return self.alpha * z_hat + (1 - self.alpha) * z_pos

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        rows = hidden_states.shape[0]
        extra = encoder_hidden_states.shape[0] - rows
        query = attn.to_q(hidden_states)
        z = self._attend(attn, query, encoder_hidden_states[:rows])
        if extra:
            guided_rows = self._nag(z[rows - extra :], self._attend(attn, query[rows - extra :],
                                                                    encoder_hidden_states[rows:]))
            z = torch.cat([z[: rows - extra], guided_rows])
        return attn.to_out[1](attn.to_out[0](z))


def _with_nag_processor(model, config: NAGConfig):
    """attn2 (cross-attention) layers get NAG; self-attention keeps diffusers' own processor."""
    processors = dict(model.attn_processors)
    for name in processors:
        if name.endswith("attn2.processor"):
            processors[name] = TorchNAGCrossAttention(config.nag_scale, config.nag_tau, config.nag_alpha)
    model.set_attn_processor(processors)
    return model


def _forward(module, params, inputs, config=None):
    """Jitted forward, NAG-guided when config is given (the context is entered inside the
    traced function, so every configuration gets its own trace)."""

    def run(params, inputs):
        if config is None:
            return module.apply({"params": params}, **inputs)
        with guided(config):
            return module.apply({"params": params}, **inputs)

    return np.asarray(jax.jit(run)(params, inputs))


def _relative_error(out, ref):
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """The SD1.5-like pair with the NAG processor, and our plain forward on the positive rows
    (make_inputs draws the context rows in order, so the first rows agree for any row count)."""
    model, folder = make_unet("sd15", tmp_path_factory.mktemp("sd15"))
    module, params = load_unet(folder)
    plain = _forward(module, params, make_inputs("sd15", batch=2, context_rows=2))
    return _with_nag_processor(model, SDXL_NAG), module, params, plain


def _check_nag_alone(kind, model, module, params):
    """Image batch B, context [positive (B); negative (B)]."""
    inputs = make_inputs(kind, batch=2, context_rows=4)
    out = _forward(module, params, inputs, SDXL_NAG)
    assert _relative_error(out, torch_forward(model, inputs)) <= 1e-4
    plain = torch_forward(model, inputs, context=inputs["encoder_hidden_states"][:2])
    assert _relative_error(out, plain) > 1e-3  # the guidance did change the prediction


def test_nag_alone_matches_the_reference_processor(sd15):
    _check_nag_alone("sd15", *sd15[:3])


def test_nag_alone_matches_the_reference_processor_sdxl(tmp_path):
    model, folder = make_unet("sdxl", tmp_path / "sdxl")
    module, params = load_unet(folder)
    _check_nag_alone("sdxl", _with_nag_processor(model, SDXL_NAG), module, params)


def test_nag_with_cfg_leaves_the_uncond_row_alone(sd15):
    """Image [uncond; cond], context [uncond; cond; negative]: NAG changes only the cond row."""
    model, module, params, plain = sd15
    inputs = make_inputs("sd15", batch=2, context_rows=3)
    out = _forward(module, params, inputs, SDXL_NAG)
    assert _relative_error(out, torch_forward(model, inputs)) <= 1e-4
    np.testing.assert_allclose(out[0], plain[0], rtol=0, atol=1e-5 * np.abs(plain).max())
    assert _relative_error(out[1], plain[1]) > 1e-3


def test_nag_off_is_the_plain_forward_bit_for_bit(sd15):
    """nag_scale <= 1: the negative rows are ignored and no negative branch is computed."""
    _, module, params, plain = sd15
    inputs = make_inputs("sd15", batch=2, context_rows=4)
    off = _forward(module, params, inputs, NAGConfig(nag_scale=1.0, nag_tau=2.5, nag_alpha=0.5))
    np.testing.assert_array_equal(off, plain)
