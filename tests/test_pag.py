"""PAG (perturbed-attention guidance) equals diffusers' PAG pipelines, and composes with NAG.

UNet (tiny SD1.5-like and SDXL-like folders): PAG alone and with CFG equal
StableDiffusion(XL)PAGPipeline built from the same folder and fed the same latents; PAG + CFG +
NAG equals that pipeline with the reference NAG of torch_nag.py on attn2, its negative rows
belonging to the cond rows (not to diffusers' perturbed rows, which come last there).
SD3 (a tiny SD3-Medium-like folder: diffusers' PAG joint processors skip QK-norm, so SD3.5
folders are not compared): PAG with and without CFG equals StableDiffusion3PAGPipeline. At the
model level, the joint transform with PAG and NAG equals torch_sd3_nag.py's reference with the
PAG mask, with the perturbed rows untouched by NAG and the uncond rows untouched by both.
Images in [0, 1] must agree within 1e-3, as in the other pipeline parity tests. Also: our
`pag_applied_layers` selection equals diffusers' own, pag_scale = 0 is the plain program
(no perturbed rows), changing pag_scale does not recompile, bad PAG arguments are ValueErrors.
"""

from __future__ import annotations

import copy
import re

import jax
import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3PAGPipeline, StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline
from diffusers.models.attention_processor import AttnProcessor2_0, PAGCFGIdentitySelfAttnProcessor2_0
from diffusers.pipelines.pag.pag_utils import PAGMixin

import nag_jax
from convert.sd3 import load_sd3_transformer
from nag_jax.intercept import NAGConfig, PAGConfig, guided
from tiny_flux_pipeline import make_flux_pipeline
from tiny_pipelines import make_sd_pipeline
from tiny_sd3 import build_model, sample_inputs, save_diffusers
from tiny_sd3_pipeline import make_sd3_pipeline
from torch_nag import NAGCrossAttentionProcessor, with_nag_context
from torch_sd3_nag import NAGJointAttnProcessor, image_rows_of_text, install_nag

PROMPT = "a photo of a cat"
STEPS = 2


def latents_for(channels):
    return np.random.default_rng(3).standard_normal((1, channels, 16, 16)).astype(np.float32)


def diffusers_images(pipe, latents, **arguments):
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=STEPS, latents=torch.from_numpy(latents), output_type="np",
                    **arguments).images


def our_images(pipe, latents, **arguments):
    return pipe(PROMPT, num_inference_steps=STEPS, latents=latents, output_type="np", **arguments).images


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    folder = make_sd_pipeline(tmp_path_factory.mktemp("sd15"), "sd15")
    return folder, nag_jax.NAGPipeline.from_pretrained(folder), StableDiffusionPAGPipeline.from_pretrained(folder)


@pytest.mark.parametrize(
    "arguments",
    [dict(guidance_scale=1.0, pag_scale=3.0), dict(guidance_scale=7.5, pag_scale=2.0, pag_adaptive_scale=0.002)],
    ids=["pag_alone", "pag_cfg_adaptive"],  # adaptive: at the steps' t = 501, 1 the scale is 1.002, 0.002
)
def test_unet_pag_matches_diffusers(sd15, arguments):
    _, ours, reference = sd15
    latents = latents_for(4)
    got = our_images(ours, latents, **arguments)
    np.testing.assert_allclose(got, diffusers_images(reference, latents, **arguments), atol=1e-3)
    without_pag = diffusers_images(reference, latents, **dict(arguments, pag_scale=0.0))
    assert np.abs(got - without_pag).max() > 1e-2  # PAG changed the image
    programs = len(ours.sampler._compiled)
    stronger = our_images(ours, latents, **dict(arguments, pag_scale=arguments["pag_scale"] + 1.0))
    assert len(ours.sampler._compiled) == programs  # the scale is traced: no new program
    assert np.abs(stronger - got).max() > 1e-2


class CondRowsNAG:
    """torch_nag's NAG processor for diffusers' PAG batch [uncond;] cond; perturbed: it guides
    the last image rows, so the perturbed group is moved in front around the call and NAG's
    negative rows meet the cond rows."""

    def __init__(self, nag_processor, row_groups):
        self.nag, self.row_groups = nag_processor, row_groups

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
        rows = hidden_states.shape[0]
        group = rows // self.row_groups
        order = torch.cat([torch.arange(rows - group, rows), torch.arange(rows - group)])
        context = torch.cat([encoder_hidden_states[:rows][order], encoder_hidden_states[rows:]])
        out = self.nag(attn, hidden_states[order], context)
        return out[torch.argsort(order)]


def test_unet_pag_cfg_nag_matches_reference(sd15):
    """PAG on the mid block's attn1 (diffusers' PAG processors), NAG on every attn2 for the cond
    rows; nag_end=0.5 cuts after the first step (t = 501 >= 499 > 1), so the second scan runs
    PAG without NAG."""
    folder, ours, reference = sd15
    latents = latents_for(4)
    pag = dict(guidance_scale=7.5, pag_scale=2.0)
    nag = dict(nag_scale=3.0, nag_alpha=0.375, nag_end=0.5)
    got = our_images(ours, latents, nag_negative_prompt="a dog", **pag, **nag)

    pipe = StableDiffusionPAGPipeline(**dict(reference.components, unet=copy.deepcopy(reference.unet)))
    nag_processor = NAGCrossAttentionProcessor(nag["nag_scale"], 2.5, nag["nag_alpha"])
    pipe.unet.set_attn_processor({name: CondRowsNAG(nag_processor, 3) if ".attn2." in name else AttnProcessor2_0()
                                  for name in pipe.unet.attn_processors})  # the PAG call puts its own on attn1
    negative = pipe.encode_prompt("a dog", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    with_nag_context(pipe.unet, negative, nag["nag_end"])
    np.testing.assert_allclose(got, diffusers_images(pipe, latents, **pag), atol=1e-3)
    assert np.abs(got - diffusers_images(reference, latents, **pag)).max() > 1e-2  # NAG changed the image


def test_pag_off_is_the_plain_program(sd15):
    """pag_scale = 0 (the default) ignores the other PAG arguments: the same images bit for bit,
    and the compiled denoiser sees the CFG batch only, no perturbed rows."""
    _, ours, _ = sd15
    fresh = nag_jax.NAGPipeline(ours.family)
    rows_traced = []
    denoise = fresh.sampler.denoise
    fresh.sampler.denoise = lambda params, x, *rest: rows_traced.append(x.shape[0]) or denoise(params, x, *rest)
    latents = latents_for(4)
    plain = our_images(fresh, latents, guidance_scale=7.5)
    off = our_images(fresh, latents, guidance_scale=7.5, pag_scale=0.0, pag_adaptive_scale=0.5,
                     pag_applied_layers=["up", "down"])
    np.testing.assert_array_equal(off, plain)
    assert rows_traced == [2]  # one compiled program for both calls, [uncond; cond]
    assert [key[1].pag_layers for key in fresh.sampler._compiled] == [frozenset()]


def diffusers_pag_selection(pipe, patterns) -> set[str]:
    """The attention modules diffusers' PAG mixin selects for `patterns` (with CFG)."""
    saved = pipe.unet.attn_processors
    pipe.set_pag_applied_layers(patterns)
    PAGMixin._set_pag_attn_processor(pipe, patterns, do_classifier_free_guidance=True)
    chosen = {name for name, module in pipe.unet.named_modules()
              if isinstance(getattr(module, "processor", None), PAGCFGIdentitySelfAttnProcessor2_0)}
    pipe.unet.set_attn_processor(saved)
    return chosen


def test_sdxl_pag_cfg_matches_diffusers_and_selects_its_layers(tmp_path):
    folder = make_sd_pipeline(tmp_path, "sdxl")
    layers = ["mid", "up_blocks.0.attentions.1"]
    ours = nag_jax.NAGPipeline.from_pretrained(folder)
    reference = StableDiffusionXLPAGPipeline.from_pretrained(folder, pag_applied_layers=layers)
    latents = latents_for(4)
    arguments = dict(guidance_scale=5.0, pag_scale=3.0)
    got = our_images(ours, latents, pag_applied_layers=layers, **arguments)
    np.testing.assert_allclose(got, diffusers_images(reference, latents, **arguments), atol=1e-3)
    assert np.abs(got - diffusers_images(reference, latents, **dict(arguments, pag_scale=0.0))).max() > 1e-2

    found = ours._guided_layers  # every guided layer's path, traced by the PAG call above
    for patterns in (["mid"], layers, ["down"], ["up_blocks.0.attentions.(0|2)"], ["transformer_blocks.1"], ["attn"]):
        ours_selected = ours._pag_layers(patterns, found)
        assert {re.sub("[_/]", ".", path.removesuffix("/core")) for path in ours_selected} == {
            name.replace("_", ".") for name in diffusers_pag_selection(reference, patterns)}, patterns


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    folder = make_sd3_pipeline(tmp_path_factory.mktemp("sd3"), qk_norm=None)
    return folder, nag_jax.NAGPipeline.from_pretrained(folder)


@pytest.mark.parametrize(
    "arguments",
    [dict(guidance_scale=5.0, pag_scale=2.0), dict(guidance_scale=1.0, pag_scale=3.0, pag_applied_layers="blocks.0")],
    ids=["pag_cfg_default_layers", "pag_alone_first_block"],
)
def test_sd3_pag_matches_diffusers(sd3, arguments):
    folder, ours = sd3
    arguments = dict(arguments)
    layers = arguments.pop("pag_applied_layers", "blocks.1")  # diffusers' default
    reference = StableDiffusion3PAGPipeline.from_pretrained(folder, pag_applied_layers=layers)
    latents = latents_for(16)
    got = our_images(ours, latents, pag_applied_layers=layers, **arguments)
    np.testing.assert_allclose(got, diffusers_images(reference, latents, **arguments), atol=1e-3)
    assert np.abs(got - diffusers_images(reference, latents, **dict(arguments, pag_scale=0.0))).max() > 4e-3


def test_sd3_joint_pag_with_nag_matches_reference(tmp_path):
    """SD3.5-Medium-like (QK-norm, MMDiT-X attn2 left alone), PAG in block 1's joint attention:
    image rows [perturbed; uncond; cond], text rows [cond; uncond; cond; nag_negative]."""
    model = build_model("sd35_medium", seed=3)
    save_diffusers(model, tmp_path, sharded=False)
    module, params = load_sd3_transformer(tmp_path)
    nag = dict(nag_scale=5.0, nag_tau=2.5, nag_alpha=0.125)
    latents, text, pooled, _ = sample_inputs(batch=3, seed=4)
    latents = np.concatenate([latents[2:], latents[1:]])  # the perturbed row is the cond row's copy
    _, negative, negative_pooled, _ = sample_inputs(batch=1, seed=5)
    text = np.concatenate([text[2:], text[1:], negative])
    pooled = np.concatenate([pooled[2:], pooled[1:], negative_pooled])
    timestep = np.full(3, 700.0, np.float32)

    def ours(config, rows=4):
        with guided(config):
            # a fresh function per config: jit must not reuse a trace made under another config
            out = jax.jit(lambda *args: module.apply(*args))({"params": params}, latents, text[:rows], pooled[:rows],
                                                              timestep)
        return np.asarray(out)

    pag = PAGConfig(frozenset({"blocks_1/attn"}), row_groups=3)
    got = ours(NAGConfig(**nag, pag=pag))

    reference = copy.deepcopy(model)
    install_nag(reference, *nag.values())
    reference.transformer_blocks[1].attn.set_processor(NAGJointAttnProcessor(*nag.values(), perturbed_rows=1))
    with torch.no_grad():
        args = (latents, text, pooled, timestep[image_rows_of_text(3, 4)])
        want = reference(*(torch.from_numpy(a) for a in args)).sample.numpy()
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale

    pag_only = ours(NAGConfig(pag=pag), rows=3)  # no negative rows
    nag_only = ours(NAGConfig(**nag))  # no perturbed layer: its first row is the plain cond row
    np.testing.assert_allclose(got[0], pag_only[0], atol=1e-5 * scale)  # perturbed row: PAG, no NAG
    np.testing.assert_allclose(got[1], pag_only[1], atol=1e-5 * scale)  # uncond row: neither
    np.testing.assert_allclose(got[1], nag_only[1], atol=1e-5 * scale)
    np.testing.assert_allclose(got[2], nag_only[2], atol=1e-5 * scale)  # cond row: NAG, not perturbed
    assert np.abs(pag_only[0] - nag_only[0]).max() > 1e-2 * scale  # the identity map changed the perturbed row
    assert np.abs(nag_only[2] - pag_only[2]).max() > 1e-2 * scale  # NAG changed the cond row


FAST = dict(num_inference_steps=1, guidance_scale=1.0, output_type="latent")
BAD_PAG = [
    (dict(pag_scale=-1.0), "pag_scale", "-1.0"),
    (dict(pag_scale="strong"), "pag_scale", "'strong'"),
    (dict(pag_scale=2.0, pag_adaptive_scale=-0.1), "pag_adaptive_scale", "-0.1"),
    (dict(pag_scale=2.0, pag_applied_layers=[]), "pag_applied_layers", "[]"),
    (dict(pag_scale=2.0, pag_applied_layers=3), "pag_applied_layers", "3"),
    (dict(pag_scale=2.0, pag_applied_layers="blocks.(1"), "pag_applied_layers", "'blocks.(1'"),
    (dict(pag_scale=2.0, pag_applied_layers=["mid", "nowhere"]), "pag_applied_layers", "'nowhere'"),
]


@pytest.mark.parametrize("arguments,name,value", BAD_PAG, ids=[f"{n}={v}" for _, n, v in BAD_PAG])
def test_bad_pag_argument_raises_one_value_error_naming_it(sd15, arguments, name, value):
    _, ours, _ = sd15
    with pytest.raises(ValueError) as error:
        ours("a cat", **FAST, **arguments)
    assert type(error.value) is ValueError
    assert str(error.value).startswith(name) and value in str(error.value), error.value


def test_pag_on_flux_is_an_error(tmp_path):
    pipe = nag_jax.NAGPipeline.from_pretrained(make_flux_pipeline(tmp_path))
    with pytest.raises(ValueError, match=r"^pag_scale = 2.0 asks for PAG, which the Flux schnell pipeline does not have"):
        pipe("a cat", pag_scale=2.0, **FAST)
